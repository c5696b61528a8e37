"""Training on Ray clusters: two nodes (engines on one, learners on the other) and `ray job submit`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_train_e2e_cpu import tiny_config

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engines_and_learners_on_different_nodes(tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    script = tmp_path / "multinode.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(REPO / 'tests')!r})
            if __name__ == "__main__":
                from ray.cluster_utils import Cluster
                from pathlib import Path
                from test_train_e2e_cpu import tiny_config
                from orchestrator.trainer import train
                cluster = Cluster(initialize_head=True, connect=True,
                                  head_node_args={{"num_cpus": 2, "resources": {{"rollout_node": 4}}}})
                cluster.add_node(num_cpus=3, resources={{"learner_node": 4}})
                cluster.wait_for_nodes()
                config = tiny_config(Path({str(tiny_checkpoint)!r}), Path({str(synth_dir)!r}), Path({str(out)!r}),
                                     "total_steps=2", "checkpoint.every=0",
                                     "rollout.resources={{rollout_node: 1}}",
                                     "learner.resources={{learner_node: 1}}")
                summary = train(config, console=False)
                print("SUMMARY", json.dumps({{"steps": summary["steps"]}}))
                import ray
                ray.shutdown()
                cluster.shutdown()
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'SUMMARY {"steps": 2}' in proc.stdout
    placement = json.loads((out / "placement.json").read_text())
    engine_nodes = {e["node_id"] for e in placement["engines"]}
    learner_nodes = {r["node_id"] for r in placement["learner_ranks"]}
    assert len(engine_nodes) == 1 and len(learner_nodes) == 1
    assert engine_nodes.isdisjoint(learner_nodes)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head of its own (`ray start --block` in a new session), its dashboard and job API on
    loopback. Stopped by signalling its process group: `ray stop` would stop every Ray here."""
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 turns token authentication on for new clusters; clients must say so to send the token
    env["RAY_AUTH_MODE"] = "token"
    temp = Path("/tmp") / f"ray-job-{os.getpid()}"
    start = [
        str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4", "--block",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
        "--include-dashboard=true", "--disable-usage-stats",
        # the agents' default ports are fixed: another Ray on this machine (the suite's own) holds them,
        # and a head whose job agent cannot bind answers every submit with "No available agent"
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            try:
                head.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # stragglers of the group
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_training(ray_head, tiny_checkpoint, synth_dir, tmp_path) -> None:
    dashboard, gcs, env = ray_head
    out = tmp_path / "job-run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, "total_steps=2", "checkpoint.every=0")
    config_file = tmp_path / "job.yaml"
    from orchestrator.config import dump_config

    config_file.write_text(dump_config(config))
    for _ in range(60):  # the job API comes up a little after `ray start` returns
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard], capture_output=True, env=env)
        if probe.returncode == 0:
            break
        time.sleep(2)
    assert probe.returncode == 0, probe.stderr[-2000:]
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
        str(BIN / "echoink"), "train", "--config", str(config_file),
    ]
    for _ in range(30):
        proc = subprocess.run(submit, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
        # the job agent on the node starts a little after the job API: nothing was submitted yet
        if proc.returncode == 0 or "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "succeeded" in proc.stdout.lower()
    assert f"run folder:   {out}" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoints" / "step-000002" / "run_state.json").is_file()
