"""An engine pool: spreads questions over engine actors, least loaded first, results in input order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from avqa import Record
from rollout.types import RolloutResult, SamplingSettings


@dataclass
class PendingRollout:
    """Rollouts in flight: one Ray future per engine and where its results go."""

    futures: list[Any]
    slots: list[list[int]]
    size: int
    engines: list[int]
    records: list[list[Record]]

    def ready(self) -> bool:
        done, _ = ray.wait(self.futures, num_returns=len(self.futures), timeout=0)
        return len(done) == len(self.futures)


class EnginePool:
    """Holds engine actor handles; keeps each question's G completions together on one engine."""

    def __init__(self, engines: Sequence[Any]) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = list(engines)
        self.load = [0] * len(self.engines)  # questions in flight per engine

    def assign(self, count: int) -> list[int]:
        """Engine index per question, filling the least-loaded engine first."""
        load = list(self.load)
        out = []
        for _ in range(count):
            target = min(range(len(load)), key=lambda i: (load[i], i))
            out.append(target)
            load[target] += 1
        return out

    def submit(
        self,
        records: Sequence[Record],
        n: int,
        sampling: SamplingSettings,
        salt: int | None = None,
        media_overrides: Sequence[dict[str, Any] | None] | None = None,
    ) -> PendingRollout:
        targets = self.assign(len(records))
        futures, slots, engines, groups = [], [], [], []
        for engine in sorted(set(targets)):
            idx = [i for i, t in enumerate(targets) if t == engine]
            sub = [records[i] for i in idx]
            overrides = [media_overrides[i] for i in idx] if media_overrides else None
            futures.append(self.engines[engine].generate.remote(sub, n, sampling, salt, overrides))
            slots.append(idx)
            engines.append(engine)
            groups.append(sub)
            self.load[engine] += len(idx)
        return PendingRollout(futures, slots, len(records), engines, groups)

    def collect(self, pending: PendingRollout) -> list[RolloutResult]:
        out: list[RolloutResult | None] = [None] * pending.size
        try:
            parts = ray.get(pending.futures)
        finally:
            for engine, idx in zip(pending.engines, pending.slots, strict=True):
                self.load[engine] -= len(idx)
        for idx, part in zip(pending.slots, parts, strict=True):
            for i, result in zip(idx, part, strict=True):
                out[i] = result
        return [r for r in out if r is not None]

    def generate(
        self,
        records: Sequence[Record],
        n: int,
        sampling: SamplingSettings,
        salt: int | None = None,
        media_overrides: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[RolloutResult]:
        return self.collect(self.submit(records, n, sampling, salt, media_overrides))

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call one method on every engine and wait for all."""
        return ray.get([getattr(e, method).remote(*args) for e in self.engines])
