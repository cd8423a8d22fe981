"""The VQA answer processor of the EvalAI VQA challenge, rule for rule, quirks included.

VQAv2, TextVQA and VizWiz scores are only comparable with published numbers when answers are
normalised exactly as the reference scorers do. The reference is the answer processor the EvalAI
VQA challenge runs on submissions (the official VQA evaluation's ``processPunctuation`` and
``processDigitArticle``, preceded by a tokenisation step), which lmms-eval ships as
``EvalAIAnswerProcessor`` and uses for VQAv2, TextVQA, VizWiz and OK-VQA. vtc reimplements its
published rules; the steps, in order:

1. :func:`tokenize` (EvalAI only): lower-case; delete every ``,`` and ``?``; ``'s`` becomes
   `` 's`` (``"dog's"`` -> ``"dog 's"``); strip. Then newlines and tabs become spaces, strip.
2. :func:`process_punctuation`: for each mark of :data:`PUNCTUATION` (``; / [ ] " { } ( ) = + \\
   _ - > < @ ` , ? !``): when the *input* has the mark next to a space, or has a comma between two
   digits, the mark is deleted, otherwise it becomes a space. Then every period not followed by a
   digit is deleted, at most 32 of them (the reference passes ``re.UNICODE`` (= 32) where
   ``re.sub`` expects its ``count``). Marks outside the list (``: ' % $ # & * ^ ~ |``) stay.
3. :func:`process_digit_article`: lower-case, split on whitespace; the number words zero..ten and
   ``none`` become digits; the articles ``a``, ``an``, ``the`` are dropped; a word written as a
   known contraction without (some of) its apostrophes gets them back (``dont`` -> ``don't``,
   ``hed've`` -> ``he'd've``); words are joined by one space.

The contraction table is the reference's: every canonical form of :data:`_CANONICAL`, keyed by
that form with one of its apostrophes removed. Its quirks are kept: ``somebody'd`` becomes
``somebodyd``; the reference's capitalised keys (``Im``, ``Ive``, ``Id've``) never match the
lower-cased words, so ``im`` and ``ive`` stay as written; ``its``, ``id``, ``ill``, ``well``,
``were``, ``hell``, ``shell``, ``wed``, ``shed``, ``whos``... follow the table (only those it
lists change). Because step 1 splits ``'s`` off, ``"what's"`` becomes ``"what 's"`` while
``"whats"`` becomes ``"what's"``.

:func:`evalai_answer` runs steps 1-3, :func:`vqa_answer` steps 2-3 (what the official VQA
evaluation applies to ground truth). POPE's and MME's yes/no readings live in
:mod:`vtc.bench.metrics` with the metrics that use them.
"""

from __future__ import annotations

import re

__all__ = ["evalai_answer", "vqa_answer", "tokenize", "process_punctuation", "process_digit_article",
           "normalize_answer", "NUMBER_WORDS", "ARTICLES", "CONTRACTIONS", "PUNCTUATION"]

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# canonical spellings; each is reached from itself with any one apostrophe removed
_CANONICAL = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't
shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CANONICAL:
        for i, ch in enumerate(form):
            if ch == "'":
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"  # the reference's entry, the wrong way round
    return table


#: word -> replacement, as the reference's table acts on lower-case words
CONTRACTIONS = _contractions()

_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # re.UNICODE, passed by the reference as re.sub's count


def tokenize(text: str) -> str:
    """Step 1 (EvalAI's tokenisation): see the module docstring."""
    s = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return s.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Step 2: see the module docstring."""
    delete_all = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """Step 3: see the module docstring."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_answer(text: str) -> str:
    """Steps 2 and 3: the official VQA evaluation's normalisation."""
    return process_digit_article(process_punctuation(text))


def evalai_answer(text: str) -> str:
    """Steps 1 to 3: the EvalAI answer processor (lmms-eval's ``EvalAIAnswerProcessor``)."""
    return vqa_answer(tokenize(text))


#: the normal form vtc compares free-form answers in (agreement, answer strata): EvalAI's
normalize_answer = evalai_answer
