"""The weight-sync protocol between the learner (rank 0 sends) and every rollout engine worker.

Weights travel in buckets: each bucket is one flat byte buffer plus an index of names, shapes,
dtypes and offsets, agreed by both sides before any byte moves. The buffers go through a
torch process group of their own — NCCL on GPUs, gloo on CPUs — so the same code runs in CI and
on a cluster: rank 0 is the learner, engine ``i`` with tensor-parallel size ``tp`` holds ranks
``1 + i·tp … i·tp + tp``.
"""

from __future__ import annotations

import datetime
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

ALIGN = 64  # byte alignment of each tensor in a bucket, enough for any dtype view

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int  # bytes from the start of the bucket

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=DTYPES[self.dtype]).element_size()


@dataclass(frozen=True)
class BucketSpec:
    tensors: tuple[TensorSpec, ...]
    nbytes: int


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(
    tensors: Iterable[tuple[str, Sequence[int], torch.dtype | str]], bucket_bytes: int
) -> list[BucketSpec]:
    """Group tensors, in order, into buckets of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[BucketSpec] = []
    current: list[TensorSpec] = []
    used = 0
    for name, shape, dtype in tensors:
        dname = dtype if isinstance(dtype, str) else dtype_name(dtype)
        if dname not in DTYPES:
            raise ValueError(f"{name}: dtype {dname} cannot be sent")
        spec = TensorSpec(name, tuple(int(s) for s in shape), dname, 0)
        size = _aligned(spec.nbytes)
        if current and used + size > bucket_bytes:
            buckets.append(BucketSpec(tuple(current), used))
            current, used = [], 0
        current.append(TensorSpec(spec.name, spec.shape, spec.dtype, used))
        used += size
    if current:
        buckets.append(BucketSpec(tuple(current), used))
    return buckets


def pack_bucket(spec: BucketSpec, tensors: Sequence[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """Copy ``tensors`` (in the spec's order) into one flat uint8 buffer."""
    if len(tensors) != len(spec.tensors):
        raise ValueError(f"bucket expects {len(spec.tensors)} tensors, got {len(tensors)}")
    device = device if device is not None else (tensors[0].device if tensors else "cpu")
    flat = torch.empty(spec.nbytes, dtype=torch.uint8, device=device)
    for ts, tensor in zip(spec.tensors, tensors, strict=True):
        if tuple(tensor.shape) != ts.shape or dtype_name(tensor.dtype) != ts.dtype:
            raise ValueError(
                f"{ts.name}: expected {ts.dtype}{list(ts.shape)}, got {dtype_name(tensor.dtype)}{list(tensor.shape)}"
            )
        view = flat[ts.offset : ts.offset + ts.nbytes].view(DTYPES[ts.dtype]).view(ts.shape)
        view.copy_(tensor.detach())
    return flat


def unpack_bucket(spec: BucketSpec, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into ``flat``, named as in the spec (no copy)."""
    if flat.dtype != torch.uint8 or flat.numel() != spec.nbytes:
        raise ValueError(f"bucket buffer must be {spec.nbytes} uint8 bytes, got {flat.numel()} {flat.dtype}")
    return [
        (ts.name, flat[ts.offset : ts.offset + ts.nbytes].view(DTYPES[ts.dtype]).view(ts.shape))
        for ts in spec.tensors
    ]


@dataclass(frozen=True)
class GroupInfo:
    """Where and how the sync group meets; created by the orchestrator, sent to every member."""

    host: str
    port: int
    world_size: int
    backend: str  # "gloo" or "nccl"
    timeout_s: float = 600.0


def engine_ranks(engine_index: int, tensor_parallel_size: int) -> list[int]:
    """Sync-group ranks of one engine's workers (rank 0 is the learner)."""
    start = 1 + engine_index * tensor_parallel_size
    return list(range(start, start + tensor_parallel_size))


# This process's sync groups that are open (made and not closed), and the most that were open at
# once: a member that replaces its group closes the old one first (`SyncGroup.close`), so that
# an engine restart never leaves a second communicator (NCCL buffers on a GPU, gloo's sockets
# and threads, the rendezvous store's port) beside the new one.
_open: weakref.WeakSet[SyncGroup] = weakref.WeakSet()
_census = {"made": 0, "closed": 0, "most_open": 0}


def census() -> dict[str, int]:
    """This process's sync groups: ``open`` now, ``made`` and ``closed`` so far, ``most_open`` at
    once (what tests of the group's life read inside a learner rank or an engine)."""
    return {"open": len(_open), **_census}


class SyncGroup:
    """A process group of its own (not the default one), so it can sit beside DeepSpeed's or vLLM's."""

    def __init__(self, info: GroupInfo, rank: int, device: torch.device | str = "cpu") -> None:
        if not 0 <= rank < info.world_size:
            raise ValueError(f"rank {rank} outside world of {info.world_size}")
        self.info = info
        self.rank = rank
        self.device = torch.device(device)
        timeout = datetime.timedelta(seconds=info.timeout_s)
        store = dist.TCPStore(
            info.host, info.port, info.world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False
        )
        self.store = store
        if info.backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, info.world_size, timeout)
        elif info.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, info.world_size, options)
        else:
            raise ValueError(f"unknown sync backend {info.backend!r} (gloo or nccl)")
        _open.add(self)
        _census["made"] += 1
        _census["most_open"] = max(_census["most_open"], len(_open))

    def close(self) -> None:
        """Tear the communicator down now, not whenever the object happens to be collected; a
        second call does nothing. NCCL's is aborted: a member that replaces its group does so
        because the members changed, and a peer that died mid-push would keep a graceful
        shutdown waiting for its part of the last collective. Gloo's is shut down, which closes
        its connections; the store goes with the last reference (rank 0's frees its port)."""
        group, self.group = self.group, None
        if group is None:
            return
        _open.discard(self)
        _census["closed"] += 1
        try:
            if self.info.backend == "nccl":
                group.abort()
            else:
                group.shutdown()
        finally:
            self.store = None

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Start a broadcast from rank 0; the caller waits on the returned work."""
        if self.group is None:
            raise RuntimeError(f"sync group rank {self.rank} of {self.info.host}:{self.info.port} is closed")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = datetime.timedelta(seconds=self.info.timeout_s)
        return self.group.broadcast([tensor], opts)


def send_buckets(group: SyncGroup, buckets: Iterable[torch.Tensor]) -> int:
    """Rank 0: broadcast each packed bucket; returns bytes sent. One bucket in flight behind the next."""
    sent = 0
    pending: tuple[dist.Work, torch.Tensor] | None = None
    for flat in buckets:
        work = group.broadcast(flat)
        if pending is not None:
            pending[0].wait()
        pending = (work, flat)
        sent += flat.numel()
    if pending is not None:
        pending[0].wait()
    return sent


def receive_buckets(group: SyncGroup, specs: Sequence[BucketSpec]) -> Iterator[tuple[str, torch.Tensor]]:
    """Engine ranks: yield named tensors as buckets arrive; the next bucket is already on its way
    while the caller loads the current one."""
    if not specs:
        return

    def start(i: int) -> tuple[dist.Work, torch.Tensor]:
        flat = torch.empty(specs[i].nbytes, dtype=torch.uint8, device=group.device)
        return group.broadcast(flat), flat

    ahead = start(0)
    for i, spec in enumerate(specs):
        work, flat = ahead
        work.wait()
        if i + 1 < len(specs):
            ahead = start(i + 1)
        yield from unpack_bucket(spec, flat)


def send_raw(group: SyncGroup, buffers: Sequence[torch.Tensor]) -> int:
    """Rank 0: broadcast ready buffers back to back (the transport's floor, for benchmarks)."""
    return send_buckets(group, iter(buffers))


def receive_raw(group: SyncGroup, sizes: Sequence[int]) -> int:
    """Engine ranks: receive buffers of ``sizes`` bytes and drop them (the transport's floor)."""
    buffers = [torch.empty(size, dtype=torch.uint8, device=group.device) for size in sizes]
    works = [group.broadcast(flat) for flat in buffers]  # all posted at once: nothing but the wire
    for work in works:
        work.wait()
    received = sum(sizes)
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    return received
