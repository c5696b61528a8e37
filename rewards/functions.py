"""Reward functions over one completion's text and its record. Pure, total: never raise on any text.

Every function here is linear in the completion's length and reads all of it: a long completion
is scored as it is, never cut (the reference code does not cut either).
"""

from __future__ import annotations

import re
from typing import Literal

from avqa.record import parse_answer_letters

# The reference run's patterns (EchoInk, src/r1-v/src/open_r1/grpo.py), kept as the specification
# that the linear-time functions below are tested against. FORMAT_RE has no DOTALL flag: `.` in the
# look-aheads stops at a newline, as in the reference code.
FORMAT_RE = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)  # the reference; see extract_answer
LENIENT_RE = re.compile(r"^\(?([A-Z])(?:[.)\s]|$)")
_WHITESPACE = re.compile(r"\s*")  # the `\s*` between </think> and <answer>: regex whitespace exactly

AccuracyMatch = Literal["exact", "letters"]
ACCURACY_MATCHES: tuple[str, ...] = ("exact", "letters")

THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"


def _as_text(text: object) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return ""
    return text


def format_ok(text: str) -> bool:
    """Whether ``text`` (already stripped) fully matches :data:`FORMAT_RE`, in linear time.

    The regex backtracks: on text with many ``</think>`` and a late or missing ``</answer>`` it
    rescans the rest of the text once per ``</think>`` (quadratic). The same language, decided in one
    pass: (1) the first line (``.`` stops at a newline) holds ``<think>`` at most once and
    ``<answer>`` at most once; (2) the text starts with ``<think>`` and ends with ``</answer>``;
    (3) some ``</think>`` after at least one character of reasoning is followed by whitespace and
    ``<answer>`` with at least one character before the closing tag. For (3) the first such
    ``</think>`` decides: a later one puts ``<answer>`` later still, which leaves less room.
    """
    newline = text.find("\n")
    first_line = text if newline < 0 else text[:newline]
    if first_line.count(THINK) > 1 or first_line.count(ANSWER) > 1:
        return False
    if not (text.startswith(THINK) and text.endswith(ANSWER_END)):
        return False
    closing = len(text) - len(ANSWER_END)  # where the final </answer> starts
    pos = len(THINK) + 1  # the reasoning holds at least one character
    while True:
        end_think = text.find(THINK_END, pos)
        if end_think < 0:
            return False
        opening = _WHITESPACE.match(text, end_think + len(THINK_END)).end()
        if text.startswith(ANSWER, opening):
            return opening + len(ANSWER) < closing  # the answer holds at least one character
        pos = end_think + 1


def format_reward(text: object) -> float:
    """1.0 when the stripped completion is exactly `<think>…</think> <answer>…</answer>`
    (:data:`FORMAT_RE`, the reference's pattern), else 0.0."""
    return 1.0 if format_ok(_as_text(text).strip()) else 0.0


def extract_answer(text: object) -> str | None:
    r"""The stripped content of the first `<answer>…</answer>`, or None.

    Same result as the reference's ``<answer>\s*(.*?)\s*</answer>`` (DOTALL) search, in linear
    time: that regex is quadratic on text with many openings and no closing tag.
    """
    text = _as_text(text)
    start = text.find(ANSWER)
    if start < 0:
        return None
    end = text.find(ANSWER_END, start + len(ANSWER))
    if end < 0:
        return None
    return text[start + len(ANSWER) : end].strip()


def predicted_letters(text: object, *, lenient: bool = False) -> frozenset[str]:
    """The option letters a completion answers with (empty when it gives none)."""
    answer = extract_answer(text)
    if answer is None:
        return frozenset()
    letters = parse_answer_letters(answer)
    if not letters and lenient:
        match = LENIENT_RE.match(answer)
        if match:
            letters = frozenset(match.group(1))
    return letters


def accuracy_reward(text: object, answer: str, *, match: AccuracyMatch = "letters", lenient: bool = False) -> float:
    """1.0 when the completion's first answer is the gold answer, else 0.0.

    ``match="exact"`` (the reference, ``grpo.py``'s multiple-choice branch): the stripped content of
    the first ``<answer>…</answer>`` equals the stripped gold string, character for character, so
    "C C", "CC", "C;" and "c" are wrong for gold "C", and "C, A" is wrong for gold "A,C".

    ``match="letters"``: the answer's letters, read as a set ("C", "A,C", "AC", "A; C"; capitals
    only), equal the gold letters; for multi-answer data. ``lenient`` (letters only) also takes a
    leading letter followed by '.', ')' or a space ("C. Drum", "C) …").
    """
    if match == "exact":
        if lenient:
            raise ValueError("accuracy_reward: lenient reads letters; it does not apply to match='exact'")
        predicted = extract_answer(text)
        gold_text = answer.strip()
        return 1.0 if gold_text and predicted == gold_text else 0.0
    if match != "letters":
        raise ValueError(f"accuracy_reward: unknown match {match!r}; choose from {', '.join(ACCURACY_MATCHES)}")
    gold = parse_answer_letters(answer)
    if not gold:
        return 0.0
    return 1.0 if predicted_letters(text, lenient=lenient) == gold else 0.0


TAGS = (THINK, THINK_END, ANSWER, ANSWER_END)


def tag_reward(text: object) -> float:
    """Partial format credit: the share of the four tags the completion contains (a shaping
    reward with signal even for an untrained policy; not part of the reference run)."""
    t = _as_text(text)
    return sum(tag in t for tag in TAGS) / len(TAGS)
