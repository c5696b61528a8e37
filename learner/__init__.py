"""The learner: GRPO math, the DeepSpeed learner worker and group, and sending weights."""
