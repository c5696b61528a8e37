"""Shared fixtures: a synthetic dataset and a tiny checkpoint, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.placement import actor_env

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# DeepSpeed compiles a CPU communication op on first use; keep the build between runs
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))
# the test session's Ray workers (and engines built in this process) get what the trainer's actors get
for _key, _value in actor_env().items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avqa.synth import synth_dataset

    out = tmp_path_factory.mktemp("synth")
    synth_dataset(out, train=24, val=12, seed=7)
    return out


@pytest.fixture(scope="session")
def train_json(synth_dir: Path) -> Path:
    return synth_dir / "train" / "omni_rl_format_train.json"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omni.fixtures.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-omni"), seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with more logical CPUs than cores (actors mostly wait)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
