"""Colocated engines on GPUs: the engines sleep while the learner trains and wake for the new
weights (vLLM's sleep mode), so an engine and a learner rank share one GPU's memory in turns.

On CPUs nothing sleeps (vLLM has no sleep mode there; the roles share the host's memory): the
same loop runs with `GpuSharing(enabled=False)` and only the weights' transport differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# call(method, *args) → one report per engine ({"seconds", "gpu_used_gb"}); the trainer's, which
# restarts engines that died during the call
EngineCall = Callable[..., list[dict[str, float]]]


class GpuSharing:
    def __init__(self, call: EngineCall, *, enabled: bool, sync_every: int) -> None:
        self.call = call
        self.enabled = enabled
        # level 2 drops the weights, which the push after each step replaces; level 1 keeps them
        # in host memory when steps go by without a push
        self.level = 2 if sync_every == 1 else 1

    def sleep(self) -> dict[str, float]:
        """Before the learner's step: the engines free their GPU memory."""
        if not self.enabled:
            return {}
        reports = self.call("sleep", self.level)
        return {"timing/sleep_s": _most(reports, "seconds"), "memory/gpu_used_asleep_gb": _most(reports, "gpu_used_gb")}

    def wake_and_push(self, push: Callable[[], float] | None) -> dict[str, float]:
        """After the learner's step: wake the weights, ``push`` (if any), then wake the KV cache:
        loading the weights needs only their own memory back."""
        if not self.enabled:
            return {"timing/weight_sync_s": push() if push else 0.0}
        woke = self.call("wake_up", ["weights"] if push else ["weights", "kv_cache"])
        seconds = push() if push else 0.0
        if push:
            cache = self.call("wake_up", ["kv_cache"])
            woke = [{"seconds": a["seconds"] + b["seconds"], "gpu_used_gb": b["gpu_used_gb"]} for a, b in zip(woke, cache, strict=False)]
        return {"timing/weight_sync_s": seconds, "timing/wake_s": _most(woke, "seconds"),
                "memory/gpu_used_awake_gb": _most(woke, "gpu_used_gb")}


def _most(reports: Sequence[dict[str, Any]], key: str) -> float:
    return max((float(r[key]) for r in reports), default=0.0)
