"""Rule-based rewards: format, accuracy, and a registry of weighted reward functions."""

from rewards.functions import (
    ACCURACY_MATCHES,
    AccuracyMatch,
    accuracy_reward,
    extract_answer,
    format_ok,
    format_reward,
    predicted_letters,
    tag_reward,
)
from rewards.registry import (
    DEFAULT_ACCURACY_MATCH,
    REWARDS,
    RewardResult,
    RewardSet,
    register_reward,
)

__all__ = [
    "ACCURACY_MATCHES",
    "DEFAULT_ACCURACY_MATCH",
    "REWARDS",
    "AccuracyMatch",
    "RewardResult",
    "RewardSet",
    "accuracy_reward",
    "extract_answer",
    "format_ok",
    "format_reward",
    "predicted_letters",
    "register_reward",
    "tag_reward",
]
