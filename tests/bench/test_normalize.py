"""vtc.bench.normalize: the EvalAI answer processor, each step against its published rule.

Every expected value is worked out by hand from the reference's rules (tokenise; punctuation
deleted next to a space or when a comma sits between digits, else a space; periods not before a
digit deleted, at most 32; number words, articles, contractions), not read off the implementation.
"""

import pytest

from vtc.bench.normalize import (
    CONTRACTIONS,
    evalai_answer,
    process_digit_article,
    process_punctuation,
    tokenize,
    vqa_answer,
)


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),
    ("Two dogs", "2 dogs"),                 # number word
    ("a dog", "dog"), ("The cat.", "cat"),  # articles; the final period goes
    ("An apple!", "apple"),                 # "!" not next to a space: a space, then collapsed
    ("1,000", "1000"),                      # step 1 deletes every comma
    ("red, white", "red white"),
    ("t-shirt", "t shirt"),                 # "-" inside a word: a space
    ("t - shirt", "t shirt"),               # "-" next to a space: deleted
    ("3.5", "3.5"), ("5.", "5"), (".5", ".5"),  # a period before a digit stays
    ("a.m.", "am"),                         # periods not before a digit go; "am" is no article
    ("50%", "50%"), ("$5", "$5"), ("#1", "#1"), ("4:30", "4:30"),  # marks outside the list stay
    ("dont", "don't"), ("don't", "don't"), ("Dont know", "don't know"),
    ("whats", "what's"), ("what's", "what 's"),  # step 1 splits "'s" off before the table applies
    ("dog's", "dog 's"),
    ("Im", "im"), ("ive", "ive"),           # the reference's keys "Im", "Ive" are capitalised: never hit
    ("hed've", "he'd've"), ("he'dve", "he'd've"), ("hes", "he's"),
    ("somebody'd", "somebodyd"),            # the reference's reversed entry
    ("its", "its"), ("well", "well"), ("were", "were"), ("id", "id"),  # not in the table
    ("none", "0"), ("ten", "10"), ("eleven", "eleven"), ("zero", "0"),
    ("Is it?", "is it"),                    # "?" deleted in step 1
    ("(a)", ""),                            # brackets become spaces, "a" is an article
    ("yes\nno", "yes no"), ("  two\tthree  ", "2 3"),
    ("x" + "." * 40, "x" + "." * 8),        # at most 32 periods deleted
    ("", ""),
])
def test_evalai_answer(raw, expected):
    assert evalai_answer(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    # without step 1: commas and "?" are list marks, "'s" stays attached
    ("red, white", "red white"),            # ", " next to a space: deleted
    ("1,000", "1000"),                      # a comma between digits: every mark deleted
    ("1,000 (approx)", "1000 approx"),      # ... brackets too, not spaced
    ("x,y", "x y"),                         # no digits: the comma becomes a space
    ("what's", "what's"), ("Why?", "why"),
])
def test_vqa_answer(raw, expected):
    assert vqa_answer(raw) == expected


def test_steps():
    assert tokenize("It's Red, Isn't It?") == "it 's red isn't it"
    assert process_punctuation("a/b c") == "a b c" and process_punctuation("a / b") == "a  b"
    assert process_digit_article("The two ONE") == "2 1"
    # every canonical form is reached with any one apostrophe removed, and only then
    assert CONTRACTIONS["couldnt've"] == CONTRACTIONS["couldn'tve"] == "couldn't've"
    assert "couldntve" not in CONTRACTIONS and "hedve" not in CONTRACTIONS
    assert CONTRACTIONS["yall'd've"] == CONTRACTIONS["y'alld've"] == CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert CONTRACTIONS["twas"] == "'twas" and CONTRACTIONS["ow's'at"] == "'ow's'at"
