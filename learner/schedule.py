"""Learning-rate schedules as multipliers of the base rate, by optimizer step (0-based)."""

from __future__ import annotations

import math


def lr_multiplier(step: int, *, total: int, warmup: int = 0, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif kind == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"unknown lr schedule {kind!r} (cosine, linear, constant)")
    return min_ratio + (1.0 - min_ratio) * shape
