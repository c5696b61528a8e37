"""What a checkpoint holds besides the weights and the optimizer: everything the driver needs so that
a resumed (or automatically restarted) run trains as if it never stopped.

- the step and the sampler's position (after every question drawn so far);
- the counters that limits are checked against (skipped steps, engine restarts, failed
  checkpoints, steps without signal, restarts): a limit holds over the whole run, not per call;
- one step off policy, the next step's rollout: its questions were drawn and rolled out on the
  weights of the step before, which a resumed run no longer has; it is kept, so the resumed run
  trains on exactly those completions (and draws exactly the questions the straight run drew).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rollout.types import Completion, RolloutResult

COUNTERS = ("skipped_steps", "engine_restarts", "checkpoint_failures", "no_signal_steps", "restarts")


@dataclass
class PendingBatch:
    """A rolled-out batch not yet trained on: the next step's, one step off policy."""

    step: int
    indices: list[int]
    salts: list[int | str]
    results: list[RolloutResult]
    rollout_seconds: float = 0.0


@dataclass
class RunState:
    step: int
    total_steps: int
    sampler: dict[str, int]
    counters: dict[str, int] = field(default_factory=dict)
    pending: PendingBatch | None = None
    config: dict[str, Any] = field(default_factory=dict)
    time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["pending"] = None if self.pending is None else _pending_json(self.pending)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "run_state.json") -> RunState:
        """A run state as `to_json` wrote it; checkpoints from before counters and pending batches
        were kept load with none (their runs were on policy or resumed inexactly)."""
        try:
            pending = data.get("pending")
            return cls(
                step=int(data["step"]),
                total_steps=int(data.get("total_steps", 0)),
                sampler=dict(data["sampler"]),
                counters={k: int(v) for k, v in (data.get("counters") or {}).items() if k in COUNTERS},
                pending=None if pending is None else _pending_from_json(pending),
                config=dict(data.get("config") or {}),
                time=float(data.get("time", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: not a run state ({type(exc).__name__}: {exc})") from None


def _float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # JSON has no NaN: vLLM's missing log-probs


def _pending_json(batch: PendingBatch) -> dict[str, Any]:
    return {
        "step": batch.step,
        "indices": list(batch.indices),
        "salts": list(batch.salts),
        "rollout_seconds": batch.rollout_seconds,
        "results": [
            {
                "record_id": r.record_id,
                "prompt_token_ids": list(r.prompt_token_ids),
                "error": r.error,
                "completions": [
                    {"text": c.text, "token_ids": list(c.token_ids), "logprobs": [_float(x) for x in c.logprobs],
                     "finish_reason": c.finish_reason}
                    for c in r.completions
                ],
            }
            for r in batch.results
        ],
    }


def _pending_from_json(data: dict[str, Any]) -> PendingBatch:
    results = [
        RolloutResult(
            record_id=str(r["record_id"]),
            prompt_token_ids=[int(t) for t in r["prompt_token_ids"]],
            completions=[
                Completion(text=c["text"], token_ids=[int(t) for t in c["token_ids"]],
                           logprobs=[float(x) for x in c["logprobs"]], finish_reason=c["finish_reason"])
                for c in r["completions"]
            ],
            error=r.get("error"),
        )
        for r in data["results"]
    ]
    return PendingBatch(step=int(data["step"]), indices=[int(i) for i in data["indices"]], salts=list(data["salts"]),
                        results=results, rollout_seconds=float(data.get("rollout_seconds", 0.0)))
