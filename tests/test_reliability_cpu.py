"""Faults survived: dead engines and learner ranks, non-finite steps, crashes while checkpointing,
a full disk, sync timeouts, broken records skipped, unsafe pickles refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train_e2e_cpu import tiny_config

from avqa import load_records
from orchestrator.checkpoint import (
    last_checkpoint_words,
    latest_checkpoint,
    list_checkpoints,
    read_run_state,
)
from orchestrator.sampler import QuestionSampler
from orchestrator.trainer import train
from watch.jsonl import read_metrics

REPO = Path(__file__).resolve().parent.parent


def expected_ids(train_json: Path, steps: int, per_step: int = 2, seed: int = 0) -> list[tuple[int, list[str]]]:
    """What an uninterrupted run draws: the seeded sampler over the training records."""
    records = load_records(train_json)
    sampler = QuestionSampler(len(records), seed)
    return [(step, [records[i].id for i in sampler.next(per_step)]) for step in range(1, steps + 1)]


def drawn_ids(run: Path) -> list[tuple[int, list[str]]]:
    rows = [json.loads(line) for line in (run / "questions.jsonl").read_text().splitlines()]
    return [(r["step"], r["ids"]) for r in rows]


def run_in_thread(config, **kwargs):
    box: dict = {}

    def target() -> None:
        try:
            box["summary"] = train(config, console=False, **kwargs)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def wait_until(ready, thread: threading.Thread, what: str, timeout: float = 300) -> None:
    """Poll ``ready()`` while the run's thread lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach {what}")


def wait_for_step(run: Path, step: int, thread: threading.Thread) -> None:
    def reached() -> bool:
        path = run / "metrics.jsonl"
        return path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines() if line)

    wait_until(reached, thread, f"step {step}")


def test_a_killed_engine_is_restarted_and_no_question_is_lost(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=5", "checkpoint.every=0", "sync.timeout_s=30")
    thread, box = run_in_thread(config)
    wait_for_step(out, 2, thread)
    engine = json.loads((out / "placement.json").read_text())["engines"][0]
    os.kill(engine["pid"], signal.SIGKILL)  # as the kernel's OOM killer would
    # the restarted engine is named anew: Ray may still hold the dead one's name (and the
    # dashboard then lists both, the dead one and its replacement, each by its own name)
    named = ray_local.util.list_named_actors  # the live ones of this namespace
    wait_until(lambda: f"{engine['actor']}-restart-1" in named(), thread, "the restarted engine")
    assert engine["actor"] not in named()
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert box["summary"]["finished"]
    assert drawn_ids(out) == expected_ids(synth_dir / "train" / "omni_rl_format_train.json", 5)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["data/completions"] == 2 * 4 for r in rows)  # every question's G completions, once
    assert rows[-1]["faults/engine_restarts"] == 1


def actors_named(ray, names: set[str]) -> dict[str, str]:
    """Ray's actor table (its control store's, no dashboard needed): each named actor's state."""
    from ray._private.state import actors

    return {row["Name"]: row["State"] for row in actors().values() if row["Name"] in names}


def running(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_train_returns_once_its_actors_are_gone(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    """Right after train() returns, Ray lists every actor of the run as DEAD and none of their
    processes runs (on a GPU: their memory is free for whatever comes next)."""
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=1", "checkpoint.every=0",
                         "checkpoint.at_end=false")
    assert train(config, console=False)["finished"]
    placed = json.loads((out / "placement.json").read_text())
    members = placed["engines"] + placed["learner_ranks"]
    assert running([m["pid"] for m in members]) == []
    names = {m["actor"] for m in members}
    assert len(names) == 3 and actors_named(ray_local, names) == dict.fromkeys(names, "DEAD")


def test_an_actor_whose_process_does_not_end_is_named(ray_local) -> None:
    """An actor whose process does not respond (stopped here, as one stuck in a GPU driver call
    would look) outlives ray.kill for a while: Ray lists it DEAD at once, but its process runs
    on. The wait gives up at its timeout naming the actor by its Ray name and its process; a
    second wait sees the process end (Ray force-kills it after its own grace period)."""
    from orchestrator.teardown import describe, kill_and_wait

    @ray_local.remote(num_cpus=0)
    class Stuck:
        def pid(self) -> int:
            return os.getpid()

    name = f"stuck-{os.getpid()}"
    stuck = Stuck.options(name=name).remote()
    pid = ray_local.get(stuck.pid.remote())
    entry = describe(stuck)
    assert entry.name == name and entry.pids == [pid]
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        survivors = kill_and_wait([stuck], timeout_s=1.0)
        assert 1.0 <= time.monotonic() - started < 10
        assert survivors == [f"{name} (process {pid} on node {entry.node_id[:12]})"]
        assert actors_named(ray_local, {name}) == {name: "DEAD"}
        assert kill_and_wait([stuck], timeout_s=120) == [] and running([pid]) == []
    finally:
        if running([pid]):
            os.kill(pid, signal.SIGKILL)


def test_engine_restart_limit_ends_the_run(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(
        tiny_checkpoint, synth_dir, out, "total_steps=50", "checkpoint.every=0", "faults.max_engine_restarts=0"
    )
    thread, box = run_in_thread(config)
    wait_for_step(out, 1, thread)
    os.kill(json.loads((out / "placement.json").read_text())["engines"][0]["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert isinstance(box.get("error"), RuntimeError)
    assert "exceed faults.max_engine_restarts=0" in str(box["error"]) and "--resume" in str(box["error"])


def test_a_killed_learner_rank_resumes_from_the_last_checkpoint(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(
        tiny_checkpoint, synth_dir, out, "total_steps=5", "checkpoint.every=2", "faults.max_restarts=1",
        "faults.collective_timeout_s=60",
    )
    thread, box = run_in_thread(config)
    wait_for_step(out, 3, thread)
    rank1 = json.loads((out / "placement.json").read_text())["learner_ranks"][1]["pid"]
    os.kill(rank1, signal.SIGKILL)
    thread.join(timeout=900)
    assert "error" not in box, box.get("error")
    summary = box["summary"]
    assert summary["finished"] and summary["restarts"] == 1
    assert drawn_ids(out) == expected_ids(synth_dir / "train" / "omni_rl_format_train.json", 5)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_killed_learner_without_restarts_says_how_to_resume(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=50", "checkpoint.every=1")
    thread, box = run_in_thread(config)
    # metrics of step 1 land before its checkpoint: wait for a completed one, else the kill can
    # fall inside the first save and there is nothing to name
    wait_until(lambda: bool(list_checkpoints(out)), thread, "a completed checkpoint")
    os.kill(json.loads((out / "placement.json").read_text())["learner_ranks"][0]["pid"], signal.SIGKILL)
    thread.join(timeout=900)
    message = str(box.get("error"))
    assert "learner rank died" in message and "--resume" in message
    assert f"the last checkpoint is {out / 'checkpoints'}/step-0000" in message


def test_learner_ranks_killed_during_a_weight_push_restart_from_the_last_checkpoint(
    ray_local, tiny_checkpoint, synth_dir, tmp_path, monkeypatch
) -> None:
    """Both ranks are SIGKILLed inside their 3rd push (the one after step 2; the 1st is the push at
    start), before step 2's checkpoint: the push raises LearnerDied, not Ray's raw actor error,
    and the run restarts from step 1's checkpoint. The restarted ranks are new processes whose
    failpoint counts start again, so they push twice (at start, after step 2) and finish."""
    monkeypatch.setenv("ECHOINK_FAILPOINTS", "learner.push@3=kill")
    out = tmp_path / "run"
    config = tiny_config(
        tiny_checkpoint, synth_dir, out, "total_steps=2", "checkpoint.every=1", "faults.max_restarts=1",
        "faults.collective_timeout_s=60", "sync.timeout_s=60",
    )
    summary = train(config, console=False)
    assert summary["finished"] and summary["restarts"] == 1
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert drawn_ids(out) == expected_ids(synth_dir / "train" / "omni_rl_format_train.json", 2)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]


def test_resume_words_without_a_checkpoint_say_step_zero(tmp_path) -> None:
    assert "no checkpoint was completed yet" in last_checkpoint_words(tmp_path)
    assert "starts from step 0" in last_checkpoint_words(tmp_path)
    done = tmp_path / "checkpoints" / "step-000004"
    done.mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-000006").mkdir()  # an unfinished save is not named
    assert "no checkpoint" in last_checkpoint_words(tmp_path)
    (done / "run_state.json").write_text("{}")
    assert last_checkpoint_words(tmp_path) == f"the last checkpoint is {done}"


def test_nonfinite_steps_are_skipped_then_stop_the_run(ray_local, tiny_checkpoint, synth_dir, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    # from the 3rd micro-batch on, each rank's loss is NaN (a failpoint inside the learner)
    monkeypatch.setenv("ECHOINK_FAILPOINTS", "learner.loss@3+=nan")
    config = tiny_config(
        tiny_checkpoint, synth_dir, out, "total_steps=20", "checkpoint.every=0", "faults.max_nonfinite_steps=2",
        "learner.micro_batch_size=4",
    )
    with pytest.raises(RuntimeError, match=r"2 optimizer steps skipped for non-finite"):
        train(config, console=False)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["learner/step_skipped"] for r in rows] == [0.0, 0.0, 1.0]  # the 2nd skip stops before logging
    assert rows[-1]["learner/skipped_steps"] == 1 and rows[-1]["learner/nonfinite_loss"] > 0
    assert rows[1]["grad_norm"] > 0


@pytest.mark.parametrize("point", ["checkpoint.model_written", "checkpoint.state_written", "checkpoint.renamed"])
def test_killed_while_checkpointing_then_resumed(ray_local, tiny_checkpoint, synth_dir, tmp_path, point: str) -> None:
    """SIGKILL the training process at a point inside the second checkpoint; resume from what is on disk."""
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=4", "checkpoint.every=2")
    config_file = tmp_path / "run.yaml"
    from orchestrator.config import dump_config

    config_file.write_text(dump_config(config))
    # join this session's Ray by its address (not "auto": another Ray may have started since)
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "ECHOINK_FAILPOINTS": f"{point}@2=kill", "RAY_ADDRESS": address}
    proc = subprocess.run(
        [sys.executable, "-m", "echoink.cli", "train", "--config", str(config_file)],
        env=env, capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    latest = latest_checkpoint(out)
    expected_latest = 4 if point == "checkpoint.renamed" else 2
    assert latest is not None and read_run_state(latest)["step"] == expected_latest
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(latest))  # loadable
    summary = train(config, console=False, resume=True)
    assert summary["finished"] and summary["steps"] == 4
    assert drawn_ids(out) == expected_ids(synth_dir / "train" / "omni_rl_format_train.json", 4)
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(ray_local, tiny_checkpoint, synth_dir, tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv("ECHOINK_FAILPOINTS", "checkpoint.model_written@2=enospc")
    import omni.fixtures.failpoints as fp

    fp._hits.clear()
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=6", "checkpoint.every=2")
    summary = train(config, console=False)
    assert summary["finished"]
    assert [s for s, _ in list_checkpoints(out)] == [2, 6]  # step 4 failed, 2 kept, 6 written
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["faults/checkpoint_failures"] == 1


def test_a_write_failing_on_one_rank_fails_the_save_on_every_rank(ray_local, tiny_checkpoint, tmp_path) -> None:
    """Two ZeRO-3 ranks (gloo). First save: rank 0's write fails before the weight gathers that
    rank 1 is already in; second save: rank 1's own file of DeepSpeed's train state fails, after
    rank 0 wrote its files and before DeepSpeed's closing barrier. Each time every rank raises
    the same error at once (a rank left behind in a collective would wait the collective timeout)
    and the group goes on: the third save is whole, and loads."""
    from test_learner_group_cpu import settings

    from learner.checkpoint_io import CheckpointWriteFailed
    from learner.group import LearnerGroup

    # rank 1 writes one file per save (its ZeRO partition), so its 1st write is in the 2nd save:
    # the failed 1st save stopped before any train-state file
    failing = {"env_vars": {"ECHOINK_FAILPOINTS": "learner.write.rank0@1=enospc,learner.write.rank1@1=enospc"}}
    s = settings(tiny_checkpoint, num_ranks=2, zero_stage=3, gradient_checkpointing=False, collective_timeout_s=300)
    group = LearnerGroup(s, [{"num_cpus": 1, "runtime_env": failing}] * 2)
    try:
        for n, (rank, part) in enumerate([(0, "the model folder"), (1, "the train state")], start=1):
            started = time.monotonic()
            with pytest.raises(CheckpointWriteFailed) as failed:
                group.save(str(tmp_path / f"save-{n}"))
            assert time.monotonic() - started < 60, "a rank waited in a collective that the other had left"
            message = str(failed.value)
            assert f"writing {part}" in message and f"failed on learner rank {rank} " in message, message
            assert "No space left on device" in message and list(failed.value.failures) == [rank]
        group.save(str(tmp_path / "save-3"), {"step": 3})
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(tmp_path / "save-3"))
        assert group.load_train_state(str(tmp_path / "save-3"))["step"] == 3
    finally:
        group.kill()


def test_a_write_failing_on_rank_1_skips_that_checkpoint_and_the_run_goes_on(
    ray_local, tiny_checkpoint, synth_dir, tmp_path, monkeypatch
) -> None:
    """Rank 1's own file of step 4's checkpoint fails (a full disk, as rank 1 sees it) while rank 0
    has written its files: every rank skips that checkpoint, the run keeps step 2's, counts the
    failure, goes on and finishes. Bounded well below the collective timeout: a rank left waiting
    in DeepSpeed's barrier would hang the run for that long."""
    monkeypatch.setenv("ECHOINK_FAILPOINTS", "learner.write.rank1@2=enospc")  # rank 1: one file per save
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=6", "checkpoint.every=2",
                         "faults.collective_timeout_s=1200")
    thread, box = run_in_thread(config)
    thread.join(timeout=900)
    assert not thread.is_alive(), "the run hung after a failed checkpoint"
    assert "error" not in box, box.get("error")
    assert box["summary"]["finished"]
    assert [s for s, _ in list_checkpoints(out)] == [2, 6]  # step 4 failed, 2 kept, 6 written
    assert not list((out / "checkpoints").glob(".tmp-*"))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["faults/checkpoint_failures"] for r in rows] == [0, 0, 0, 0, 1, 1]


def test_broken_records_are_skipped_counted_and_listed(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    train_json = data / "train" / "omni_rl_format_train.json"
    raw = json.loads(train_json.read_text())
    raw[1]["solution"] = "<answer>Z</answer>"  # refused when loading
    (data / "train" / raw[2]["path"]["audio"]).unlink()  # refused when loading (missing file)
    (data / "train" / raw[3]["path"]["image"]).write_bytes(b"\xff\xd8\xff broken")  # fails in rollout
    train_json.write_text(json.dumps(raw))
    config = tiny_config(tiny_checkpoint, data, tmp_path / "run", "total_steps=12", "grpo.questions_per_step=2",
                         "checkpoint.every=0", "data.skip_bad_records=true")
    summary = train(config, console=False)
    assert summary["finished"]
    bad = [json.loads(line) for line in (tmp_path / "run" / "bad_records.jsonl").read_text().splitlines()]
    stages = {(b["stage"], str(b["id"])) for b in bad}
    assert ("load", str(raw[1]["problem_id"])) in stages and ("load", str(raw[2]["problem_id"])) in stages
    assert ("rollout", str(raw[3]["problem_id"])) in stages  # 22 usable records, 24 drawn: every one seen
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["data/bad_records"] == len(bad) >= 3
    without = tiny_config(tiny_checkpoint, data, tmp_path / "strict", "total_steps=12")
    with pytest.raises(ValueError, match=r"record 1 .*field 'solution'"):
        train(without, console=False)


def test_weight_push_to_a_dead_engine_fails_within_the_timeout(ray_local, tiny_checkpoint) -> None:
    from test_learner_group_cpu import settings

    from learner.group import LearnerGroup
    from orchestrator.weight_sync import WeightSync
    from rollout.engine import RolloutEngine
    from rollout.pool import EngineDied, EnginePool
    from rollout.types import EngineSettings

    learner = LearnerGroup(settings(tiny_checkpoint), [{"num_cpus": 1}])
    engine = ray_local.remote(RolloutEngine).options(num_cpus=1).remote(
        EngineSettings(model_path=tiny_checkpoint, max_model_len=1024, enforce_eager=True)
    )
    try:
        ray_local.get(engine.ping.remote())  # started (the timeout is for the transport, not start-up)
        sync = WeightSync(learner, EnginePool([engine]), backend="gloo", bucket_bytes=1 << 20, timeout_s=10)
        assert sync.push().tensors > 0
        ray_local.kill(engine)
        started = time.monotonic()
        with pytest.raises(EngineDied) as died:  # typed, naming the engine: the trainer restarts it
            sync.push()
        assert died.value.engines == [0]
        assert time.monotonic() - started < 30
    finally:
        learner.kill()


def test_unsafe_pickles_in_a_train_state_are_refused(tmp_path) -> None:
    from learner.checkpoint_io import safe_torch_load

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    path.write_bytes(pickle.dumps({"optimizer_state_dict": Exploit()}))
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(str(path))
    assert not (tmp_path / "pwned").exists()
