"""An engine pool: spreads questions over engine actors, least loaded first, results in input order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from avqa import Record
from rollout.types import RolloutResult, SamplingSettings


class EngineDied(RuntimeError):
    def __init__(self, engines: list[int]) -> None:
        self.engines = engines
        super().__init__(f"rollout engine(s) {engines} died")


@dataclass
class PendingRollout:
    """Rollouts in flight: one Ray future per engine and where its results go."""

    futures: list[Any]
    slots: list[list[int]]
    size: int
    engines: list[int]


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
        salt: int | Sequence[int | str] | None = None,
        media_overrides: Sequence[dict[str, Any] | None] | None = None,
    ) -> PendingRollout:
        """``salt``: one for every question, or one per question (a question asked twice in one
        step needs two, or its completions repeat: the request seed derives from the question and
        the salt, `rollout.engine.request_seed`)."""
        targets = self.assign(len(records))
        if salt is not None and not isinstance(salt, int) and len(salt) != len(records):
            raise ValueError(f"{len(salt)} salts for {len(records)} questions")
        futures, slots, engines = [], [], []
        for engine in sorted(set(targets)):
            idx = [i for i, t in enumerate(targets) if t == engine]
            sub = [records[i] for i in idx]
            overrides = [media_overrides[i] for i in idx] if media_overrides else None
            salts = salt if salt is None or isinstance(salt, int) else [salt[i] for i in idx]
            futures.append(self.engines[engine].generate.remote(sub, n, sampling, salts, overrides))
            slots.append(idx)
            engines.append(engine)
            self.load[engine] += len(idx)
        return PendingRollout(futures, slots, len(records), engines)

    def collect(self, pending: PendingRollout) -> list[RolloutResult]:
        results, dead = self.collect_partial(pending)
        if dead:
            raise EngineDied(dead)
        return [r for r in results if r is not None]

    def collect_partial(self, pending: PendingRollout) -> tuple[list[RolloutResult | None], list[int]]:
        """Results in input order, ``None`` where the engine died; and the indices of dead engines."""
        out: list[RolloutResult | None] = [None] * pending.size
        dead: list[int] = []
        for future, engine, idx in zip(pending.futures, pending.engines, pending.slots, strict=True):
            try:
                part = ray.get(future)
            except ray.exceptions.RayActorError:
                dead.append(engine)
                continue
            finally:
                self.load[engine] -= len(idx)
            for i, result in zip(idx, part, strict=True):
                out[i] = result
        return out, dead

    def replace(self, index: int, engine: Any) -> None:
        """Put a restarted engine where a dead one was."""
        self.engines[index] = engine
        self.load[index] = 0

    def alive(self, timeout_s: float = 30.0) -> list[bool]:
        out = []
        for engine in self.engines:
            try:
                ray.get(engine.ping.remote(), timeout=timeout_s)
                out.append(True)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(False)
        return out

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
