"""Answer normalisation for VQA-style scoring, written from the VQA evaluation's description.

Before two answers are compared, both go through the same steps: lower-case; newlines and tabs
become spaces; a comma between two digits is dropped ("1,000" -> "1000"); a period is dropped
unless it is a decimal point between digits; every other punctuation mark becomes a space, except
an apostrophe inside a word; number words become digits ("two" -> "2", "none" -> "0"); the
articles "a", "an" and "the" are dropped; a contraction written without its apostrophe becomes the
apostrophe form ("dont" -> "don't", "youre" -> "you're"), so both spellings compare equal; runs of
spaces collapse to one. Unlike the reference evaluation script, which normalises the ground-truth
answers only when the annotators disagree, vtc normalises every ground-truth answer (files users
bring are not pre-normalised), so an answer always matches itself.
"""

from __future__ import annotations

import re

__all__ = ["normalize_answer", "NUMBER_WORDS", "ARTICLES", "CONTRACTIONS", "yes_no"]

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})

# apostrophe-less spelling -> canonical spelling (vtc's own list of common English contractions)
_CONTRACTED = [
    "ain't", "aren't", "can't", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hasn't", "haven't", "he'd", "he'll", "he's", "how'd", "how'll", "how's", "i'd", "i'll", "i'm",
    "i've", "isn't", "it'd", "it'll", "it's", "let's", "ma'am", "mightn't", "might've", "mustn't",
    "must've", "needn't", "o'clock", "shan't", "she'd", "she'll", "she's", "should've", "shouldn't",
    "that's", "there's", "there'd", "there'll", "they'd", "they'll", "they're", "they've", "wasn't",
    "we'd", "we'll", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've",
    "when's", "where'd", "where's", "where've", "who'd", "who'll", "who're", "who's", "who've",
    "why's", "won't", "would've", "wouldn't", "y'all", "you'd", "you'll", "you're", "you've",
]
# "well", "were", "hell", "shell", "id", "its", "lets", "wed", "ill", "shed", "whos" are ordinary
# words too; only unambiguous apostrophe-less spellings are rewritten
_AMBIGUOUS = {"well", "were", "hell", "shell", "id", "its", "lets", "wed", "ill", "shed", "hed", "cant", "wont",
              "im"}
CONTRACTIONS = {c.replace("'", ""): c for c in _CONTRACTED if c.replace("'", "") not in _AMBIGUOUS}
CONTRACTIONS.update({"cant": "can't", "wont": "won't", "im": "i'm"})  # never ordinary words in answers

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
_PUNCT = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")
_SPACES = re.compile(r"\s+")


def _word(w: str) -> str | None:
    w = w.strip("'")
    if not w:
        return None
    if w in ARTICLES:
        return None
    w = NUMBER_WORDS.get(w, w)
    if "'" not in w:
        w = CONTRACTIONS.get(w, w)
    return w


def normalize_answer(text: str) -> str:
    """The normalised form of an answer (see the module docstring for the steps)."""
    s = str(text).lower().replace("\n", " ").replace("\t", " ")
    s = _DIGIT_COMMA.sub("", s)
    s = _NON_DECIMAL_PERIOD.sub(" ", s)
    s = _PUNCT.sub(" ", s)
    words = (_word(w) for w in _SPACES.split(s.strip()))
    return " ".join(w for w in words if w)


def yes_no(text: str) -> str | None:
    """``"yes"`` / ``"no"`` read from a free-form answer, or None when it says neither.

    The first word decides when it is yes or no ("Yes, there is a dog." -> yes); otherwise the
    first of the two words anywhere in the answer does ("There is no dog" -> no).
    """
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    for w in words:
        if w in ("yes", "no", "not"):
            return "no" if w in ("no", "not") else "yes"
    return None
