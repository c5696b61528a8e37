"""Weight sync between the learner group and the engine pool: the group meets once, then every
push streams the learner's weights bucket by bucket into every engine worker.

Faults surface as the same typed errors as a step's, so one recovery covers both: a learner rank
that dies raises `learner.group.LearnerDied` (the trainer restarts the run from its last
checkpoint, or stops with the --resume hint), an engine that dies raises
`rollout.pool.EngineDied` naming it (the trainer restarts that engine and pushes again).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from learner.group import LearnerDied, LearnerGroup
from omni.handoff import Channel
from omni.weightsync import BucketSpec, GroupInfo, engine_ranks
from rollout.pool import EngineDied, EnginePool

# After a member fails with an error of its own (for example gloo's "connection closed" in an
# engine whose sender was killed), the members that died are often reported a moment later: wait
# this long for them, so that the error raised names the death rather than its echo.
DEATH_GRACE_S = 5.0

# broadcast: rank 0 → every engine over a process group (NCCL on GPUs, gloo on CPUs), across nodes;
# handoff: each rank → the engine on its own node or GPU (omni.handoff), for colocated placement
TRANSPORTS = ("broadcast", "handoff")


@dataclass
class PushReport:
    seconds: float
    bytes: float
    tensors: int
    version: int


@dataclass(frozen=True)
class _Member:
    role: str  # "learner" or "engine"
    index: int  # learner rank or engine index


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
        transport: str = "broadcast",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown weight transport {transport!r}; known: {', '.join(TRANSPORTS)}")
        self.learner = learner
        self.pool = pool
        self.tp = tensor_parallel_size
        self.timeout_s = timeout_s
        self.backend = backend
        self.transport = transport
        self.channels: list[Channel] = []
        self.specs: list[BucketSpec] = learner.weight_specs(bucket_bytes)
        self.version = 0
        self.connect()

    def connect(self) -> None:
        """(Re)build the sync group with every current engine: a restarted engine cannot join a
        group that already exists, so all members meet again on a fresh port. Hand-over: fresh
        channels, one per engine and its learner rank."""
        if self.transport == "handoff":
            self.close()
            self.channels = [Channel.create(self.timeout_s) for _ in self.pool.engines]
            return
        address = self.learner.workers[0].address.remote()
        host, port = _wait([(_Member("learner", 0), address)], self.timeout_s, "the weight-sync set-up")[0]
        self.info = GroupInfo(
            host=host,
            port=port,
            world_size=1 + len(self.pool.engines) * self.tp,
            backend=self.backend,
            timeout_s=self.timeout_s,
        )
        joins = [(_Member("learner", 0), self.learner.init_weight_sync(self.info))]
        joins += [
            (_Member("engine", i), engine.init_weight_sync.remote(self.info, engine_ranks(i, self.tp)[0]))
            for i, engine in enumerate(self.pool.engines)
        ]
        _wait(joins, self.timeout_s, "the weight-sync set-up")

    @property
    def tensors(self) -> int:
        return sum(len(s.tensors) for s in self.specs)

    def push(self) -> PushReport:
        """One full push to every engine; fails loudly (naming the stage) instead of hanging:
        `LearnerDied` or `EngineDied` when a member's process ended, `TimeoutError` past
        ``timeout_s``, else the member's own error."""
        started = time.perf_counter()
        self.version += 1
        if self.transport == "handoff":
            receivers = [
                (_Member("engine", i), engine.receive_handoff.remote(self.specs, self.version, channel))
                for i, (engine, channel) in enumerate(zip(self.pool.engines, self.channels, strict=True))
            ]
            futures = self.learner.send_weights(self.specs, self.channels)
        else:
            receivers = [
                (_Member("engine", i), engine.receive_weights.remote(self.specs, self.version))
                for i, engine in enumerate(self.pool.engines)
            ]
            futures = self.learner.send_weights(self.specs)
        senders = [(_Member("learner", r), f) for r, f in enumerate(futures)]
        results = _wait(senders + receivers, self.timeout_s, "a weight push")
        counts = results[len(senders):]
        if any(c != self.tensors for c in counts):
            raise RuntimeError(f"engines loaded {counts} tensors, expected {self.tensors}")
        return PushReport(
            seconds=time.perf_counter() - started,
            bytes=results[0]["bytes"],
            tensors=self.tensors,
            version=self.version,
        )


    def close(self) -> None:
        """Shut the hand-over channels (their queue actors)."""
        for channel in self.channels:
            with contextlib.suppress(Exception):  # gone with the cluster already
                channel.close()
        self.channels = []


def _wait(members: Sequence[tuple[_Member, Any]], timeout_s: float, what: str) -> list[Any]:
    """All results in order, failing fast: the first member that fails (or a timeout) ends the
    wait, with the typed error of the member(s) whose process died."""
    futures = [f for _, f in members]
    owner = {f: m for m, f in members}
    deadline = time.monotonic() + timeout_s
    remaining = list(futures)
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: {len(remaining)} of {len(futures)} members did not finish within {timeout_s:.0f} s")
        ready, remaining = ray.wait(remaining, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)  # raises the member's error now rather than after the others time out
            except ray.exceptions.RayActorError as exc:
                _raise_deaths(owner, [owner[ref]], exc, what)
            except Exception as exc:
                # a member's own error may be the echo of another's death: look for deaths first
                settled, _ = ray.wait(remaining, num_returns=len(remaining), timeout=DEATH_GRACE_S) if remaining else ([], [])
                dead = [owner[r] for r in settled if _died(r)]
                if dead:
                    _raise_deaths(owner, dead, exc, what)
                raise
    return ray.get(futures)


def _died(ref: Any) -> bool:
    try:
        ray.get(ref, timeout=0)
    except ray.exceptions.RayActorError:
        return True
    except Exception:
        return False
    return False


def _raise_deaths(owner: dict[Any, _Member], dead: list[_Member], exc: BaseException, what: str) -> None:
    """Raise for the members that died: learner ranks first (the run cannot go on without them),
    else the engines (which the trainer can restart), naming every member seen dead by now."""
    dead = dead + [m for r, m in owner.items() if m not in dead and _done(r) and _died(r)]
    ranks = sorted({m.index for m in dead if m.role == "learner"})
    if ranks:
        raise LearnerDied(f"a learner rank died during {what} (rank {', '.join(map(str, ranks))}): {exc}") from exc
    engines = sorted({m.index for m in dead if m.role == "engine"})
    raise EngineDied(engines) from exc


def _done(ref: Any) -> bool:
    ready, _ = ray.wait([ref], num_returns=1, timeout=0)
    return bool(ready)
