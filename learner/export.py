"""Write a checkpoint folder that vLLM and transformers both load: the source folder's config,
tokenizer and processor files, and the weights as ``thinker.…`` safetensors (sharded when large)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHARD_BYTES = 4 << 30


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
