"""vtc.bench.normalize: each normalisation step of the VQA answer comparison."""

import pytest

from vtc.bench.normalize import normalize_answer, yes_no


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),
    ("  Two\tdogs\n", "2 dogs"),          # case, whitespace, number words
    ("a dog", "dog"),                       # articles
    ("The cat.", "cat"),                    # article + trailing period
    ("An apple!", "apple"),                 # punctuation becomes space, then collapses
    ("1,000", "1000"),                      # comma between digits is dropped
    ("3.5", "3.5"),                         # decimal point kept
    ("red, white", "red white"),            # other commas become spaces
    ("t-shirt", "t shirt"),                 # hyphen becomes a space
    ("dont", "don't"),                      # contraction without apostrophe
    ("don't", "don't"),                     # already canonical
    ("youre right", "you're right"),
    ("isnt", "isn't"),
    ("dog's", "dog's"),                     # apostrophe inside a word stays
    ("'quoted'", "quoted"),                 # apostrophes around a word go
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),                   # only zero..ten become digits
    ("well", "well"),                       # an ordinary word, not "we'll"
    ("", ""),
])
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected


def test_spellings_compare_equal():
    assert normalize_answer("Two") == normalize_answer("2") == normalize_answer("two.")
    assert normalize_answer("Dont know") == normalize_answer("don't know")


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), ("No.", "no"), ("yes, there is", "yes"), ("There is no dog", "no"),
    ("it is not red", "no"), ("I think so, yes", "yes"), ("teal", None), ("", None),
])
def test_yes_no(raw, expected):
    assert yes_no(raw) == expected
