"""Weights handed over inside one node, for colocated placement (engine i and learner rank i share
a node, or a GPU: NCCL refuses two ranks on one GPU).

Same bucket protocol as :mod:`omni.weightsync` (``BucketSpec`` / ``TensorSpec``, the packing of
``pack_bucket``, ``unpack_bucket``), but instead of a collective the sender hands each packed
bucket over as a small picklable *handle*, put on a :class:`Channel` the engine reads:

- CPUs: :class:`ShmHandle`, the ``ObjectRef`` of a ``uint8`` numpy array put in Ray's object store.
  Within a node the store is shared memory, so the engine's ``ray.get`` maps the sender's bytes
  without a copy; the reference keeps the object alive while the sender holds it.
- GPUs: :class:`IpcHandle`, the arguments torch's own CUDA IPC reduction produces for a device
  buffer; the engine rebuilds a tensor on the very same memory. The sender keeps a fixed ring of
  buffers, so after the first push the engine reopens nothing (docs/ENVIRONMENT.md: the first 4 GiB
  hand-over took 4.1 s, a later one 3.2 ms, once the receiver kept its opened handles).

Who calls what (rollout and learner never import each other; the flow is the broadcast's):

1. the orchestrator makes one :class:`Channel` per engine (two Ray queues: handles to the engine,
   releases back) and starts both sides at once, as it does for a broadcast;
2. the learner rank that shares the engine's node (or GPU) runs :func:`send_over`: it packs
   bucket after bucket into its :class:`Stager` and puts each handle on the channel, never more
   than ``in_flight`` unreleased, which bounds the extra memory;
3. the engine worker (``rollout.receive.receive_handoff``) loads :func:`receive_over`'s named
   views through ``load_named_weights`` in ONE call, and releases each bucket once the loader has
   taken it. One call matters on CPUs: vLLM's in-place reload processes a layer when all its
   tensors have arrived, and a layer split over two reload calls would keep unloaded parts.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omni.weightsync import DTYPES, BucketSpec, dtype_name, unpack_bucket

__all__ = [
    "BucketHandle",
    "Channel",
    "IpcHandle",
    "ShmHandle",
    "Stager",
    "open_bucket",
    "receive_over",
    "send_over",
    "spec_digest",
]


def spec_digest(spec: BucketSpec) -> str:
    """A fingerprint of a bucket's layout (names, shapes, dtypes, offsets, size), so a buffer is
    never read with the index of another bucket."""
    text = repr((spec.nbytes, [(t.name, t.shape, t.dtype, t.offset) for t in spec.tensors]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShmHandle:
    """One bucket in Ray's object store (CPUs). ``ref`` is an ``ObjectRef`` nested in this object,
    so Ray hands it to the engine as a reference instead of resolving it on the way."""

    index: int
    digest: str
    nbytes: int
    ref: Any


@dataclass(frozen=True)
class IpcHandle:
    """One bucket in a CUDA buffer of the sender's (GPUs). ``rebuild_args`` are what
    ``torch.multiprocessing.reductions.reduce_tensor`` gives for the whole slot buffer; the bucket
    is its first ``nbytes``. ``device_uuid`` finds the GPU whatever its index is in the engine."""

    index: int
    digest: str
    nbytes: int
    slot: int
    device_uuid: str
    rebuild_args: tuple[Any, ...]


BucketHandle = ShmHandle | IpcHandle


def _pack_into(spec: BucketSpec, tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """``pack_bucket`` into a buffer that already exists (a reused GPU slot, a numpy array): one
    copy per tensor, no bucket-sized temporary. Same checks, same messages."""
    if len(tensors) != len(spec.tensors):
        raise ValueError(f"bucket expects {len(spec.tensors)} tensors, got {len(tensors)}")
    for ts, tensor in zip(spec.tensors, tensors, strict=True):
        if tuple(tensor.shape) != ts.shape or dtype_name(tensor.dtype) != ts.dtype:
            raise ValueError(
                f"{ts.name}: expected {ts.dtype}{list(ts.shape)}, "
                f"got {dtype_name(tensor.dtype)}{list(tensor.shape)}"
            )
        view = flat[ts.offset : ts.offset + ts.nbytes].view(DTYPES[ts.dtype]).view(ts.shape)
        view.copy_(tensor.detach())


def _uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class Stager:
    """The sender's side: packs buckets into buffers the engine can open, ``in_flight`` at most.

    A bucket goes into slot ``index % in_flight``; staging into a slot whose bucket was not yet
    released raises instead of overwriting bytes the engine may still be reading.
    """

    def __init__(self, device: torch.device | str, in_flight: int = 2) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self.device = torch.device(device)
        self.in_flight = in_flight
        self.kind = "ipc" if self.device.type == "cuda" else "shm"
        self._held: dict[int, int] = {}  # slot -> bucket index staged there
        self._refs: dict[int, Any] = {}  # slot -> ObjectRef (shm): the sender's reference
        self._buffers: dict[int, torch.Tensor] = {}  # slot -> device buffer (ipc), reused
        self._ipc_args: dict[int, tuple[Any, ...]] = {}
        self.peak_held = 0  # most buckets staged at once: the push's extra memory, in buckets
        # GPU slots are allocated this large at least (send_over sets the push's largest bucket):
        # a slot that had to grow would get a new IPC handle, which the engine opens again
        self.capacity = 0

    @property
    def held(self) -> list[int]:
        """Bucket indices staged and not yet released."""
        return sorted(self._held.values())

    @property
    def held_slots(self) -> set[int]:
        return set(self._held)

    def stage(self, index: int, spec: BucketSpec, tensors: Sequence[torch.Tensor]) -> BucketHandle:
        """Pack ``tensors`` (in the spec's order; shapes and dtypes checked against it) and return
        the handle the engine opens."""
        slot = index % self.in_flight
        if slot in self._held:
            raise RuntimeError(
                f"bucket {index}: its slot {slot} still holds bucket {self._held[slot]}, which the "
                f"engine has not released ({self.in_flight} buckets in flight at most)"
            )
        digest = spec_digest(spec)
        if self.kind == "shm":
            handle: BucketHandle = self._stage_shm(index, slot, digest, spec, tensors)
        else:
            handle = self._stage_ipc(index, slot, digest, spec, tensors)
        self._held[slot] = index
        self.peak_held = max(self.peak_held, len(self._held))
        return handle

    def _stage_shm(
        self, index: int, slot: int, digest: str, spec: BucketSpec, tensors: Sequence[torch.Tensor]
    ) -> ShmHandle:
        import ray

        array = np.empty(spec.nbytes, dtype=np.uint8)
        _pack_into(spec, tensors, torch.from_numpy(array))
        # ray.put copies the bytes into the node's shared-memory store once; engines on this node
        # read them in place. The ref held here is what keeps the object alive.
        ref = ray.put(array)
        self._refs[slot] = ref
        return ShmHandle(index=index, digest=digest, nbytes=spec.nbytes, ref=ref)

    def _stage_ipc(
        self, index: int, slot: int, digest: str, spec: BucketSpec, tensors: Sequence[torch.Tensor]
    ) -> IpcHandle:
        from torch.multiprocessing.reductions import reduce_tensor

        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < spec.nbytes:
            # A new allocation has a new IPC handle: the engine opens it once and keeps it, so
            # slots grow rarely (plan_buckets keeps buckets under one size, bar lone large tensors).
            size = max(spec.nbytes, self.capacity)
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._buffers[slot] = buffer
            self._ipc_args[slot] = tuple(reduce_tensor(buffer)[1])
        _pack_into(spec, tensors, buffer[: spec.nbytes])
        # the engine reads on its own stream: the bytes must be written before the handle leaves
        torch.cuda.synchronize(self.device)
        return IpcHandle(
            index=index,
            digest=digest,
            nbytes=spec.nbytes,
            slot=slot,
            device_uuid=_uuid(self.device),
            rebuild_args=self._ipc_args[slot],
        )

    def release(self, indices: Iterable[int]) -> None:
        """The engine has loaded these buckets: their slots may be reused (shm: the object store
        may free them once no reference is left)."""
        for index in indices:
            slot = index % self.in_flight
            if self._held.get(slot) == index:
                del self._held[slot]
                self._refs.pop(slot, None)

    def close(self) -> None:
        """Drop every staged bucket and buffer (the engine must not open old handles after this)."""
        self._held.clear()
        self._refs.clear()
        self._buffers.clear()
        self._ipc_args.clear()


def _check_one(position: int, spec: BucketSpec, handle: BucketHandle) -> None:
    if not isinstance(handle, ShmHandle | IpcHandle):
        raise TypeError(f"bucket {position}: {type(handle).__name__} is not a bucket handle")
    first = spec.tensors[0].name if spec.tensors else "(empty)"
    if handle.nbytes != spec.nbytes:
        raise ValueError(
            f"bucket {handle.index} (first tensor {first}): handle holds {handle.nbytes} bytes, "
            f"spec expects {spec.nbytes}"
        )
    if handle.digest != spec_digest(spec):
        raise ValueError(
            f"bucket {handle.index} (first tensor {first}): staged for another layout of names, "
            "shapes or dtypes than this spec (learner and engine planned different buckets)"
        )


def _cuda_index(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == uuid:
            return i
    raise RuntimeError(
        f"the learner's GPU {uuid} is not visible to this engine: CUDA IPC needs both on one GPU "
        "(colocated placement)"
    )


def _open_ipc(handle: IpcHandle, cache: MutableMapping[Any, Any] | None) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    key = handle.rebuild_args[7]  # the cudaIpcMemHandle of the sender's allocation
    if cache is not None:
        cached = cache.get(handle.slot)
        if cached is not None and cached[0] == key:
            return cached[1]
    args = list(handle.rebuild_args)
    args[6] = _cuda_index(handle.device_uuid)  # storage_device: the same GPU, as this process numbers it
    buffer = rebuild_cuda_tensor(*args)
    if cache is not None:
        # kept per slot: the sender reuses its slots, so the next push opens nothing
        cache[handle.slot] = (key, buffer)
    return buffer


def _open_shm(handle: ShmHandle) -> torch.Tensor:
    import ray

    array = ray.get(handle.ref)
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise TypeError(
            f"bucket {handle.index}: the object store holds {type(array).__name__}, not a uint8 array"
        )
    with warnings.catch_warnings():
        # the store maps objects read-only; the views are only read (copied into the weights)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def open_bucket(
    spec: BucketSpec, handle: BucketHandle, cache: MutableMapping[Any, Any] | None = None
) -> list[tuple[str, torch.Tensor]]:
    """The engine's side: named views into the handed-over bucket (no copy). ``cache`` (kept by the
    engine worker across pushes) holds opened CUDA IPC buffers; it is unused on CPUs."""
    _check_one(handle.index, spec, handle)
    flat = _open_shm(handle) if isinstance(handle, ShmHandle) else _open_ipc(handle, cache)
    return unpack_bucket(spec, flat[: spec.nbytes])


# --------------------------------------------------------------------------- the channel


@dataclass(frozen=True)
class Channel:
    """Between one sender and one engine: ``handles`` carries bucket handles to the engine,
    ``released`` the indices of buckets the engine has taken, back. Made by the orchestrator
    (a Ray driver), passed to both sides; picklable (the queues are Ray actors)."""

    handles: Any
    released: Any
    timeout_s: float = 600.0

    @classmethod
    def create(cls, timeout_s: float = 600.0) -> Channel:
        from ray.util.queue import Queue

        # no CPU of their own: two idle queue actors must not starve the engines and ranks
        options = {"num_cpus": 0}
        return cls(Queue(actor_options=options), Queue(actor_options=options), timeout_s)

    def close(self) -> None:
        self.handles.shutdown()
        self.released.shutdown()


def _take(queue: Any, timeout_s: float, what: str) -> Any:
    from ray.util.queue import Empty

    try:
        return queue.get(timeout=timeout_s)
    except Empty:
        raise TimeoutError(f"weight hand-over: no {what} within {timeout_s:.0f} s") from None


def send_over(
    stager: Stager,
    channel: Channel,
    specs: Sequence[BucketSpec],
    buckets: Iterable[Sequence[torch.Tensor]],
) -> int:
    """The sender's side of one push: stage each bucket (tensors in the spec's order) and hand it
    over; wait for releases to keep at most ``stager.in_flight`` staged. Returns the bytes staged
    once every bucket is released (the engine has loaded them all)."""
    # a push that failed half-way may have left buckets staged; nothing reads them any more (the
    # orchestrator makes new channels after a failure)
    stager.release(stager.held)
    stager.capacity = max([stager.capacity, *(spec.nbytes for spec in specs)])
    staged = 0
    count = 0
    for index, tensors in enumerate(buckets):
        if index >= len(specs):
            raise ValueError(f"the learner gave more buckets than the {len(specs)} bucket specs")
        spec = specs[index]
        while index % stager.in_flight in stager.held_slots:
            stager.release([_take(channel.released, channel.timeout_s, f"release before bucket {index}")])
        channel.handles.put(stager.stage(index, spec, tensors))
        staged += spec.nbytes
        count += 1
    if count != len(specs):
        raise ValueError(f"the learner gave {count} buckets for {len(specs)} bucket specs")
    while stager.held:
        stager.release([_take(channel.released, channel.timeout_s, f"release of bucket {stager.held[0]}")])
    return staged


def receive_over(
    specs: Sequence[BucketSpec], channel: Channel, cache: MutableMapping[Any, Any] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """The engine's side of one push: named views of each bucket as it arrives, checked against
    its spec. A bucket is released when the loader asks for what follows it: by then it has taken
    every view (on GPUs after a stream sync, since copies are queued). On CPUs a layer not yet
    complete may keep views of an earlier bucket; those pin the store's object, not the sender's
    memory, so releasing early is safe."""
    for index, spec in enumerate(specs):
        handle = _take(channel.handles, channel.timeout_s, f"handle of bucket {index}")
        if handle.index != index:
            raise ValueError(f"bucket {index}: the channel delivered bucket {handle.index} instead")
        yield from open_bucket(spec, handle, cache)
        if isinstance(handle, IpcHandle):
            torch.cuda.current_stream().synchronize()
        channel.released.put(index)
