"""Weight sync between the learner group and the engine pool: the group meets once, then every
push streams the learner's weights bucket by bucket into every engine worker."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from learner.group import LearnerGroup
from omni.weightsync import BucketSpec, GroupInfo, engine_ranks
from rollout.pool import EnginePool


@dataclass
class PushReport:
    seconds: float
    bytes: float
    tensors: int
    version: int


class WeightSync:
    def __init__(
        self,
        learner: LearnerGroup,
        pool: EnginePool,
        *,
        backend: str,
        bucket_bytes: int,
        tensor_parallel_size: int = 1,
        timeout_s: float = 600.0,
    ) -> None:
        self.learner = learner
        self.pool = pool
        self.tp = tensor_parallel_size
        self.timeout_s = timeout_s
        self.backend = backend
        self.specs: list[BucketSpec] = learner.weight_specs(bucket_bytes)
        self.version = 0
        self.connect()

    def connect(self) -> None:
        """(Re)build the sync group with every current engine: a restarted engine cannot join a
        group that already exists, so all members meet again on a fresh port."""
        host, port = ray.get(self.learner.workers[0].address.remote())
        self.info = GroupInfo(
            host=host,
            port=port,
            world_size=1 + len(self.pool.engines) * self.tp,
            backend=self.backend,
            timeout_s=self.timeout_s,
        )
        joins = [self.learner.init_weight_sync(self.info)]
        joins += [
            engine.init_weight_sync.remote(self.info, engine_ranks(i, self.tp)[0])
            for i, engine in enumerate(self.pool.engines)
        ]
        _wait(joins, self.timeout_s, "joining the weight-sync group")

    @property
    def tensors(self) -> int:
        return sum(len(s.tensors) for s in self.specs)

    def push(self) -> PushReport:
        """One full push to every engine; fails loudly (naming the stage) instead of hanging."""
        started = time.perf_counter()
        self.version += 1
        receivers = [engine.receive_weights.remote(self.specs, self.version) for engine in self.pool.engines]
        senders = self.learner.send_weights(self.specs)
        results = _wait(senders + receivers, self.timeout_s, "pushing weights")
        counts = results[len(senders):]
        if any(c != self.tensors for c in counts):
            raise RuntimeError(f"engines loaded {counts} tensors, expected {self.tensors}")
        return PushReport(
            seconds=time.perf_counter() - started,
            bytes=results[0]["bytes"],
            tensors=self.tensors,
            version=self.version,
        )


def _wait(futures: list[Any], timeout_s: float, what: str) -> list[Any]:
    """All results, failing fast: the first member that raises (or a timeout) ends the wait."""
    deadline = time.monotonic() + timeout_s
    remaining = list(futures)
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: {len(remaining)} of {len(futures)} members did not finish within {timeout_s:.0f} s")
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=left)
        for ref in ready:
            ray.get(ref)  # raises the member's error now rather than after the others time out
    return ray.get(futures)
