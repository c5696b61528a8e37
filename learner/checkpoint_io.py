"""A learner checkpoint on disk: the model folder that vLLM and transformers both load (the source
folder's config, tokenizer and processor files, and the weights as ``thinker.…`` safetensors,
sharded when large), and beside it in ``train_state/`` DeepSpeed's resumable state, read back
without executing anything in its pickles.

Every rank writes its own files, and the ranks meet in collectives in between (ZeRO-3 gathers for
the weights, DeepSpeed's barriers around its train state). A write that fails on one rank must not
take that rank out of step with the others: its error is held (:func:`deferred_write_errors`)
until every rank has passed the same collectives, and then all ranks agree on the outcome
(:func:`agree`) and raise the same :class:`CheckpointWriteFailed`, or none does.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHARD_BYTES = 4 << 30
TRAIN_STATE_DIR = "train_state"
TRAIN_STATE_TAG = "state"


def export_model(
    source: Path, dest: Path, named: Iterable[tuple[str, torch.Tensor]], on_write: Callable[[], None] | None = None
) -> list[Path]:
    """The loadable model folder ``dest``: ``source``'s files but its weights, and ``named``
    (vLLM-named) tensors as its weights. ``on_write()`` is called before the folder and before
    each weight file is written (the learner's failpoint)."""
    if on_write is not None:
        on_write()
    copy_model_files(source, dest)
    return write_weights(dest, named, on_write=on_write)


def copy_model_files(source: Path, dest: Path) -> None:
    """Everything of the source checkpoint except its weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".safetensors.index.json"):
            continue
        if item.is_file():
            shutil.copy2(item, dest / item.name)


def write_weights(
    dest: Path,
    named: Iterable[tuple[str, torch.Tensor]],
    shard_bytes: int = SHARD_BYTES,
    on_write: Callable[[], None] | None = None,
) -> list[Path]:
    """Stream (vLLM-named) tensors into ``model.safetensors``, or into numbered shards plus an
    index when they exceed ``shard_bytes``; each shard is written as soon as it is full (after
    ``on_write()``)."""
    written: list[tuple[Path, list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    used = 0

    def flush() -> None:
        nonlocal shard, used
        path = dest / f"shard-{len(written) + 1:05d}.tmp.safetensors"
        if on_write is not None:
            on_write()
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard), used))
        shard, used = {}, 0

    for name, tensor in named:
        size = tensor.numel() * tensor.element_size()
        if shard and used + size > shard_bytes:
            flush()
        shard[name] = tensor.detach().to("cpu").contiguous().clone()
        used += size
    if shard or not written:
        flush()
    if len(written) == 1:
        final = dest / "model.safetensors"
        written[0][0].rename(final)
        return [final]
    weight_map: dict[str, str] = {}
    paths = []
    for i, (path, names, _) in enumerate(written, start=1):
        final = dest / f"model-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(final)
        paths.append(final)
        weight_map.update(dict.fromkeys(names, final.name))
    index = {"metadata": {"total_size": sum(w[2] for w in written)}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def save_train_state(engine: Any, folder: Path, client_state: dict[str, Any] | None, frozen: bool = True) -> None:
    """This rank's part of the resumable state (weights, optimizer, schedule) of DeepSpeed's
    ``engine`` under ``folder/train_state``, with ``client_state`` (the trainer's counters).
    Without ``frozen`` the weights that do not train are left out (a LoRA run's base: the
    starting model, which a resumed run builds again)."""
    engine.save_checkpoint(
        str(folder / TRAIN_STATE_DIR), tag=TRAIN_STATE_TAG, client_state=client_state or {}, save_latest=False,
        exclude_frozen_parameters=not frozen,
    )


class CheckpointWriteFailed(OSError):
    """A checkpoint that one or more learner ranks failed to write. Every rank raises it, after
    the same collectives, so the ranks stay in step; an OSError, so the trainer handles it like a
    full disk (keeps the previous checkpoint, counts the failure, goes on). ``failures``: each
    failed rank's reason."""

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})

    def __reduce__(self) -> tuple[Any, ...]:  # keeps ``failures`` through Ray's pickling
        return (type(self), (str(self), self.failures))


@contextlib.contextmanager
def deferred_write_errors(engine: Any, on_write: Callable[[], None] | None = None) -> Iterator[list[BaseException]]:
    """While DeepSpeed's ``save_checkpoint`` runs: a write of this rank that fails (its files, the
    folders it makes, the recovery scripts rank 0 copies) is recorded in the yielded list instead
    of raised, and the rank's later writes are skipped. So the rank still enters every collective
    that comes after the write in ``save_checkpoint`` (its closing barrier, ZeRO-3's gather of the
    persistent parameters) like the ranks whose writes succeeded; raising there would leave them
    waiting until the collective timeout, or pair their next collective with a different one.
    ``on_write()`` is called before each file is written (the learner's failpoint)."""
    failures: list[BaseException] = []
    ckpt_engine = engine.checkpoint_engine

    def guarded(write: Callable[..., Any], is_file: bool = True) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if failures:
                return None  # this rank's checkpoint is lost already: write nothing more
            try:
                if on_write is not None and is_file:
                    on_write()
                return write(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - held, then agreed by every rank (agree)
                failures.append(exc)
                return None

        return call

    # every place DeepSpeed 0.19's save_checkpoint touches the disk (its engine's files and
    # folders; rank 0 copies zero_to_fp32.py beside the ZeRO files itself)
    patched = {
        (ckpt_engine, "save"): guarded(ckpt_engine.save),
        (ckpt_engine, "makedirs"): guarded(ckpt_engine.makedirs, is_file=False),
        (engine, "_copy_recovery_script"): guarded(engine._copy_recovery_script),
    }
    own = {key: key[0].__dict__.get(key[1]) for key in patched}  # instance attributes set before
    for (obj, name), call in patched.items():
        setattr(obj, name, call)
    try:
        yield failures
    finally:
        for (obj, name), before in own.items():
            if before is None:
                delattr(obj, name)  # the class's method again
            else:
                setattr(obj, name, before)


def agree(failure: BaseException | None, what: str) -> None:
    """Every rank says whether its part of ``what`` succeeded (one all-gather on the default
    process group, which every rank enters exactly once here); if any failed, every rank raises
    the same :class:`CheckpointWriteFailed` naming the failed ranks and their reasons."""
    import torch.distributed as dist

    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, mine)
    failures = {r: reason for r, reason in enumerate(reasons) if reason is not None}
    if failures:
        ranks = ", ".join(map(str, failures))
        detail = "; ".join(f"rank {r}: {reason}" for r, reason in failures.items())
        raise CheckpointWriteFailed(
            f"{what} failed on learner rank{'s' if len(failures) > 1 else ''} {ranks} ({detail}); "
            f"every rank skipped the rest of this checkpoint",
            failures,
        )


def load_train_state(engine: Any, folder: Path, frozen: bool = True) -> dict[str, Any]:
    """Restore ``engine`` from what :func:`save_train_state` wrote (without ``frozen``: the
    trainable weights only, the others keep their values); returns the client state."""
    # DeepSpeed unpickles its train state with weights_only=False: load it safely instead
    engine.checkpoint_engine.load = safe_torch_load
    _, client_state = engine.load_checkpoint(
        str(folder / TRAIN_STATE_DIR),
        tag=TRAIN_STATE_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=frozen,
    )
    return client_state or {}


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """torch.load with weights_only=True, admitting the three plain-data DeepSpeed types that its
    optimizer states hold; anything else in the file is refused, not executed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)
