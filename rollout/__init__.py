"""Rollout: vLLM engine actors, the engine pool, and receiving weights."""

from rollout.types import Completion, EngineSettings, RolloutResult, SamplingSettings

__all__ = ["Completion", "EngineSettings", "RolloutResult", "SamplingSettings"]
