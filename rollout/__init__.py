"""Rollout: vLLM engine actors, the engine pool, and receiving weights."""
