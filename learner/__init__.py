"""The learner: GRPO math, the DeepSpeed learner worker and group, and sending weights."""

from learner.grpo import LossNorm, group_advantages, group_advantages_by_id, policy_loss
from learner.types import Experience, LearnerSettings

__all__ = [
    "Experience",
    "LearnerSettings",
    "LossNorm",
    "group_advantages",
    "group_advantages_by_id",
    "policy_loss",
]
