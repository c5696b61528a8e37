"""Rewards by name, with weights: each completion gets every component and their weighted total."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from avqa.record import Record
from rewards.functions import ACCURACY_MATCHES, accuracy_reward, format_reward, tag_reward

# A reward takes (completion text, record, options) and returns a float.
RewardFn = Callable[[str, Record, Mapping[str, object]], float]

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward under ``name`` (used in the run config's ``rewards`` weights)."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward named {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return wrap


# The accuracy reward's answer matching when a RewardSet's options do not name one: the run
# config's default (`rewards.accuracy_match`, orchestrator/config.py; a test keeps them equal).
DEFAULT_ACCURACY_MATCH = "letters"


@register_reward("accuracy")
def _accuracy(text: str, record: Record, options: Mapping[str, object]) -> float:
    match = str(options.get("accuracy_match", DEFAULT_ACCURACY_MATCH))
    return accuracy_reward(text, record.answer, match=match, lenient=bool(options.get("lenient", False)))  # type: ignore[arg-type]


@register_reward("format")
def _format(text: str, record: Record, options: Mapping[str, object]) -> float:
    return format_reward(text)


@register_reward("tags")
def _tags(text: str, record: Record, options: Mapping[str, object]) -> float:
    return tag_reward(text)


@dataclass(frozen=True)
class RewardResult:
    components: dict[str, float]
    total: float
    errors: dict[str, str] = field(default_factory=dict)  # reward name → the exception it raised


@dataclass
class RewardSet:
    """The weighted rewards a run uses; ``options`` reach every function: ``accuracy_match``
    ("exact" | "letters", default :data:`DEFAULT_ACCURACY_MATCH`) and ``lenient`` (letters only)."""

    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    options: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(REWARDS))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")
        match = self.options.get("accuracy_match", DEFAULT_ACCURACY_MATCH)
        if match not in ACCURACY_MATCHES:
            raise ValueError(f"rewards option accuracy_match {match!r}: choose from {', '.join(ACCURACY_MATCHES)}")
        if match == "exact" and self.options.get("lenient"):
            raise ValueError("rewards option lenient reads option letters; it does nothing with accuracy_match exact")

    def score(self, text: str, record: Record) -> RewardResult:
        components: dict[str, float] = {}
        errors: dict[str, str] = {}
        for name in self.weights:
            try:
                value = float(REWARDS[name](text, record, self.options))
                if value != value or value in (float("inf"), float("-inf")):
                    raise ValueError(f"returned {value}")
            except Exception as exc:  # a failing user reward scores zero and is counted, not fatal
                errors[name] = f"{type(exc).__name__}: {exc}"
                value = 0.0
            components[name] = value
        total = sum(self.weights[name] * components[name] for name in self.weights)
        return RewardResult(components=components, total=total, errors=errors)
