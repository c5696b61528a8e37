"""Run checkpoints: the learner's loadable folder plus the run state, written atomically.

A checkpoint is written under a temporary name, checked, then renamed; a kill at any moment leaves
the previous checkpoint whole. Only folders with a ``run_state.json`` count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omni.fixtures.failpoints import failpoint

STEP_RE = re.compile(r"^step-(\d{6,})$")
RUN_STATE = "run_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for item in root.iterdir():
        match = STEP_RE.match(item.name)
        if match and (item / RUN_STATE).is_file():
            found.append((int(match.group(1)), item))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def last_checkpoint_words(run_dir: Path) -> str:
    """For error messages: where ``--resume`` would continue from, also when nothing was saved yet."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return f"no checkpoint was completed yet in {checkpoint_dir(run_dir)} (--resume starts from step 0)"
    return f"the last checkpoint is {latest}"


def read_run_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RUN_STATE).read_text(encoding="utf-8"))


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    run_state: dict[str, Any],
    keep_last: int,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """``write_model(tmp)`` fills a temporary folder; the run state goes last, then the rename."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    if (final / RUN_STATE).is_file():
        return final  # this step is saved already (a run resumed here and stopped again)
    tmp = root / f".tmp-{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        failpoint("checkpoint.start")
        write_model(tmp)
        failpoint("checkpoint.model_written")
        if verify is not None:
            verify(tmp)
        state_tmp = tmp / (RUN_STATE + ".part")
        state_tmp.write_text(json.dumps(run_state, indent=2, default=str) + "\n", encoding="utf-8")
        _fsync(state_tmp)
        os.replace(state_tmp, tmp / RUN_STATE)
        failpoint("checkpoint.state_written")
        if final.exists():  # an incomplete leftover (no run state): never a checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    failpoint("checkpoint.renamed")
    prune(run_dir, keep_last)
    return final


def prune(run_dir: Path, keep_last: int) -> None:
    found = list_checkpoints(run_dir)
    for _, folder in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(folder, ignore_errors=True)
    for stale in checkpoint_dir(run_dir).glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows of steps up to ``max_step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def verify_model_folder(folder: Path) -> None:
    """A written checkpoint must be loadable: a config and safetensors weights."""
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise RuntimeError(f"checkpoint {folder} is incomplete")
