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
        self.specs: list[BucketSpec] = learner.weight_specs(bucket_bytes)
        host, port = ray.get(learner.workers[0].address.remote())
        self.info = GroupInfo(
            host=host,
            port=port,
            world_size=1 + len(pool.engines) * tensor_parallel_size,
            backend=backend,
            timeout_s=timeout_s,
        )
        joins = [learner.init_weight_sync(self.info)]
        joins += [engine.init_weight_sync.remote(self.info, engine_ranks(i, self.tp)[0]) for i, engine in enumerate(pool.engines)]
        _wait(joins, timeout_s, "joining the weight-sync group")
        self.version = 0

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
    ready, pending = ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
    if pending:
        raise TimeoutError(f"{what}: {len(pending)} of {len(futures)} members did not finish within {timeout_s:.0f} s")
    return ray.get(futures)
