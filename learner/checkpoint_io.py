"""A learner checkpoint on disk: the model folder that vLLM and transformers both load (the source
folder's config, tokenizer and processor files, and the weights as ``thinker.…`` safetensors,
sharded when large), and beside it in ``train_state/`` DeepSpeed's resumable state, read back
without executing anything in its pickles."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHARD_BYTES = 4 << 30
TRAIN_STATE_DIR = "train_state"
TRAIN_STATE_TAG = "state"


def export_model(source: Path, dest: Path, named: Iterable[tuple[str, torch.Tensor]]) -> list[Path]:
    """The loadable model folder ``dest``: ``source``'s files but its weights, and ``named``
    (vLLM-named) tensors as its weights."""
    copy_model_files(source, dest)
    return write_weights(dest, named)


def copy_model_files(source: Path, dest: Path) -> None:
    """Everything of the source checkpoint except its weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".safetensors.index.json"):
            continue
        if item.is_file():
            shutil.copy2(item, dest / item.name)


def write_weights(dest: Path, named: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Stream (vLLM-named) tensors into ``model.safetensors``, or into numbered shards plus an
    index when they exceed ``shard_bytes``; each shard is written as soon as it is full."""
    written: list[tuple[Path, list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    used = 0

    def flush() -> None:
        nonlocal shard, used
        path = dest / f"shard-{len(written) + 1:05d}.tmp.safetensors"
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


def save_train_state(engine: Any, folder: Path, client_state: dict[str, Any] | None) -> None:
    """This rank's part of the resumable state (weights, optimizer, schedule) of DeepSpeed's
    ``engine`` under ``folder/train_state``, with ``client_state`` (the trainer's counters)."""
    engine.save_checkpoint(
        str(folder / TRAIN_STATE_DIR), tag=TRAIN_STATE_TAG, client_state=client_state or {}, save_latest=False
    )


def load_train_state(engine: Any, folder: Path) -> dict[str, Any]:
    """Restore ``engine`` from what :func:`save_train_state` wrote; returns the client state."""
    # DeepSpeed unpickles its train state with weights_only=False: load it safely instead
    engine.checkpoint_engine.load = safe_torch_load
    _, client_state = engine.load_checkpoint(
        str(folder / TRAIN_STATE_DIR),
        tag=TRAIN_STATE_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
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
