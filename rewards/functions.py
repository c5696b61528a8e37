"""Reward functions over one completion's text and its record. Pure, total: never raise."""

from __future__ import annotations

import re

from avqa.record import parse_answer_letters

# The reference run's patterns. FORMAT_RE has no DOTALL flag: `.` in the look-aheads stops at
# newlines, as in the reference code.
FORMAT_RE = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)  # the reference; see extract_answer
LENIENT_RE = re.compile(r"^\(?([A-Z])(?:[.)\s]|$)")

# Bounded work on pathological completions: a completion is at most a few thousand tokens.
MAX_CHARS = 200_000


def _as_text(text: object) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return ""
    return text[:MAX_CHARS]


def format_reward(text: object) -> float:
    """1.0 when the stripped completion is exactly `<think>…</think> <answer>…</answer>`."""
    return 1.0 if FORMAT_RE.fullmatch(_as_text(text).strip()) else 0.0


def extract_answer(text: object) -> str | None:
    r"""The stripped content of the first `<answer>…</answer>`, or None.

    Same result as the reference's ``<answer>\s*(.*?)\s*</answer>`` (DOTALL) search, in linear
    time: that regex is quadratic on text with many openings and no closing tag.
    """
    text = _as_text(text)
    start = text.find("<answer>")
    if start < 0:
        return None
    end = text.find("</answer>", start + len("<answer>"))
    if end < 0:
        return None
    return text[start + len("<answer>") : end].strip()


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


def accuracy_reward(text: object, answer: str, *, lenient: bool = False) -> float:
    """1.0 when the first answer's letter(s) equal the gold letter(s), compared as sets.

    Exact mode (the reference): the answer must be only the letter(s), e.g. "C", "A,C" or "AC".
    Lenient mode also takes a leading letter followed by '.', ')' or a space ("C. Drum", "C) …").
    """
    gold = parse_answer_letters(answer)
    if not gold:
        return 0.0
    return 1.0 if predicted_letters(text, lenient=lenient) == gold else 0.0


TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tag_reward(text: object) -> float:
    """Partial format credit: the share of the four tags the completion contains (a shaping
    reward with signal even for an untrained policy; not part of the reference run)."""
    t = _as_text(text)
    return sum(tag in t for tag in TAGS) / len(TAGS)
