"""Statistics of evaluation: confidence intervals, McNemar's test, reflection detection. Pure."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from rewards import predicted_letters

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (greedy accuracy)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal 95 % interval of a mean over questions (sampled accuracy: each value is a question's
    mean over its K samples, so the questions are the independent units)."""
    n = len(values)
    if n == 0:
        return (0.0, 0.0)
    mean = sum(values) / n
    if n == 1:
        return (mean, mean)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return (max(0.0, mean - half), min(1.0, mean + half))


def mcnemar(b: int, c: int) -> dict[str, float]:
    """McNemar's test on discordant pairs: b = A right / B wrong, c = A wrong / B right.

    Exact two-sided binomial p-value (small counts), and the continuity-corrected chi-square.
    """
    n = b + c
    if n == 0:
        return {"b": 0, "c": 0, "statistic": 0.0, "p_value": 1.0, "p_value_chi2": 1.0}
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    p_exact = min(1.0, 2 * tail)
    stat = (abs(b - c) - 1) ** 2 / n
    p_chi2 = math.erfc(math.sqrt(stat / 2))  # survival of chi-square with 1 degree of freedom
    return {"b": b, "c": c, "statistic": stat, "p_value": p_exact, "p_value_chi2": p_chi2}


REFLECTION_RE = re.compile(
    r"\bwait\b|\bhmm+\b|let me (?:verify|double[- ]check|check again|re-?check)|re-?evaluat|"
    r"on second thought|let me reconsider|actually,",
    re.IGNORECASE,
)
OPTION_MENTION_RE = re.compile(r"\b(?:option|answer(?: is)?|choose|pick)\s*\(?([A-Z])\b")


def think_text(text: str) -> str:
    start = text.find("<think>")
    end = text.find("</think>", start + 1) if start >= 0 else -1
    if start < 0:
        return ""
    return text[start + len("<think>") : end if end >= 0 else len(text)]


def is_reflective(text: str) -> bool:
    """Self-correction in the reasoning: reflection phrases, or the candidate option changing."""
    thought = think_text(text)
    if REFLECTION_RE.search(thought):
        return True
    mentioned = OPTION_MENTION_RE.findall(thought)
    return len(set(mentioned)) > 1


def prediction(text: str, lenient: bool = False) -> str:
    return ",".join(sorted(predicted_letters(text, lenient=lenient)))
