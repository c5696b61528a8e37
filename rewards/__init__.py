"""Rule-based rewards: format, accuracy, and a registry of weighted reward functions."""

from rewards.functions import (
    accuracy_reward,
    extract_answer,
    format_reward,
    predicted_letters,
    tag_reward,
)
from rewards.registry import REWARDS, RewardResult, RewardSet, register_reward

__all__ = [
    "REWARDS",
    "RewardResult",
    "RewardSet",
    "accuracy_reward",
    "extract_answer",
    "format_reward",
    "predicted_letters",
    "register_reward",
    "tag_reward",
]
