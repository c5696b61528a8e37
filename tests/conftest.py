"""Shared fixtures: a synthetic dataset and a tiny checkpoint, built once per test session."""

from __future__ import annotations

import contextlib
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
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from omni.fixtures.tiny_qwen3 import build_tiny_qwen3_checkpoint

    return build_tiny_qwen3_checkpoint(tmp_path_factory.mktemp("tiny-qwen3-omni"), seed=0)


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small set of every data type (video with its sound, video, audio, image, text, image + audio)."""
    from avqa.synth import DEMO_SPEC, synth_dataset

    out = tmp_path_factory.mktemp("mixed")
    synth_dataset(out, train=12, val=12, seed=0, spec=DEMO_SPEC, kind="mixed")
    return out


@pytest.fixture(scope="session")
def mixed(mixed_dir: Path) -> list:
    """The mixed set's first record of each data type, in `avqa.DATA_TYPES` order."""
    from avqa import DATA_TYPES, load_records

    first: dict = {}
    for record in load_records(mixed_dir / "train" / "omni_rl_format_train.json"):
        first.setdefault(record.data_type, record)
    assert sorted(first) == sorted(DATA_TYPES), "the mixed set holds every type"
    return [first[t] for t in DATA_TYPES]


SESSION_CPUS = 8  # logical CPUs of the session's Ray (ray_local)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session, with more logical CPUs than cores (actors mostly wait).

    It must be the session's first Ray: a test that starts one of its own in this process before
    (``echoink train`` in process without this fixture) would leave its smaller cluster to every
    later test, and an actor that asks for more CPUs than it has waits for ever (CI hung so)."""
    import ray

    if ray.is_initialized():
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < SESSION_CPUS:
            pytest.fail(f"a Ray with {cpus:g} CPUs was started in this process before the ray_local fixture; "
                        f"the test that started it must ask for ray_local (a cluster of {SESSION_CPUS} CPUs)")
    else:
        ray.init(num_cpus=SESSION_CPUS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def no_actor_outlives_its_module():
    """A test module ends with none of its Ray actors alive: one it leaves behind holds logical
    CPUs of the shared session cluster, and a later module's actors then wait for them (CI hung
    so once). The leftovers are killed, so the next module starts clean, and named in an error."""
    import ray

    before = _live_actors() if ray.is_initialized() else {}
    yield
    if not ray.is_initialized():
        return
    leaked = {actor_id: words for actor_id, words in _live_actors().items() if actor_id not in before}
    worker = ray._private.worker.global_worker
    for actor_id in leaked:  # what ray.kill does, by id (a leaked actor has no handle here)
        with contextlib.suppress(Exception):  # it may have died meanwhile
            worker.core_worker.kill_actor(ray.ActorID.from_hex(actor_id), True)
    if leaked:
        pytest.fail(f"{len(leaked)} Ray actor(s) still alive after the module: {'; '.join(leaked.values())}")


def _live_actors() -> dict[str, str]:
    """Every actor of the session's Ray that is not DEAD, by id, with its class, name and state."""
    from ray._private.state import actors

    return {
        actor_id: f"{row.get('ActorClassName')} {row.get('Name') or actor_id[:12]} ({row.get('State')})"
        for actor_id, row in actors().items()
        if row.get("State") != "DEAD"
    }
