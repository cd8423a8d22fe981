"""The embedded models' closed vocabulary, word-level tokenizer and prompt format.

Every question word of the procedural generator and of easy-VQA, every answer word, and the chat
words of the LLaVA-1.5 prompt ``"USER: <image>\\n{question} ASSISTANT:"`` form the vocabulary of a
word-level tokenizer (:func:`vtc.models.random.word_tokenizer`), built offline. An answer is one
word followed by ``</s>``; a multi-turn training sample continues with
``"USER: {question} ASSISTANT: {answer}</s>"`` turns, as LLaVA's conversations do.
"""

from __future__ import annotations

from vtc.models.tiny.questions import NUMBER_WORDS, PLURALS, TEMPLATE_WORDS
from vtc.models.tiny.scene import COLORS, SHAPES, SIZES

__all__ = ["EASY_VQA_WORDS", "EASY_VQA_ANSWERS", "ANSWER_WORDS", "WORDS", "tokenizer", "prompt", "turn",
           "EOS", "CHAT_WORDS"]

#: question and answer words of the easy-VQA data set (checked against the package by the tests)
EASY_VQA_WORDS: tuple[str, ...] = (
    "?", "a", "black", "blue", "brown", "circle", "color", "contain", "does", "gray", "green", "image", "in", "is",
    "no", "not", "of", "present", "rectangle", "red", "shape", "teal", "the", "there", "triangle", "what",
    "yellow", "yes",
)
EASY_VQA_ANSWERS: tuple[str, ...] = ("circle", "green", "red", "gray", "yes", "teal", "black", "rectangle",
                                     "yellow", "triangle", "brown", "blue", "no")
CHAT_WORDS: tuple[str, ...] = ("user", "assistant", ":")
EOS = "</s>"

#: every answer either data set can give
ANSWER_WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    ("yes", "no", *COLORS, *SHAPES, *SIZES, *NUMBER_WORDS, *EASY_VQA_ANSWERS)))
#: the whole vocabulary, in a fixed order (token ids depend on it)
WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    (*CHAT_WORDS, *TEMPLATE_WORDS, *COLORS, *SHAPES, *PLURALS.values(), *SIZES, *NUMBER_WORDS, "yes", "no", *EASY_VQA_WORDS,
     *EASY_VQA_ANSWERS)))


def tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` over :data:`WORDS` (left padding, ``<image>`` special)."""
    from vtc.models.random import word_tokenizer

    return word_tokenizer(WORDS)


def prompt(question: str) -> str:
    """The single-turn LLaVA-1.5 prompt; the model's next word is the answer."""
    return f"USER: <image>\n{question} ASSISTANT:"


def turn(question: str, answer: str) -> str:
    """A later turn of a multi-turn training conversation (no image), answer included."""
    return f"USER: {question} ASSISTANT: {answer}{EOS}"
