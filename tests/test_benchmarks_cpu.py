"""The benchmark scripts run end to end on the CPU (`--cpu`: a tiny layout, a step or two): they
check the scripts — their real Ray, DeepSpeed, vLLM and transformers paths, the printed table with
its ratio last, the JSON record — and no number (a CPU says nothing about GPU throughput)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_benchmark(script: str, args: list[str], tmp_path: Path) -> tuple[list[str], Path]:
    """Run benchmarks/``script`` in a fresh process; returns its stdout lines and its record folder."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),  # where common.report writes the JSON record
        "ECHOINK_BENCH_DIR": str(tmp_path / "work"),  # its model and data folders
        # a local Ray of its own: never join a cluster that another process started with `ray start`
        "RAY_ADDRESS": "local",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [line for line in proc.stdout.splitlines() if line.strip()], out


def test_bench_learner_prints_the_learner_over_bare_ratio(tmp_path: Path) -> None:
    # one invocation covers every path: the bare yardstick (and its profiled step), both learner
    # runs (shared prompts and one copy each) under ZeRO-3 from a config-only folder (random init)
    lines, out = run_benchmark("bench_learner.py", ["--cpu", "--profile", "--breakdown", "--arm", "tower_attention=per_window"],
                               tmp_path)
    assert lines[-1].startswith("learner (one copy each) / bare fwd+bwd, step time")  # the same work on both sides
    float(lines[-1].split()[-1])  # the ratio is a number
    table = "\n".join(lines)
    for row in ("bare fwd+bwd: step (median)", "learner, shared prompts: step (median)",
                "learner, one copy each: step (median)", "bare, profiled step (synced phases)",
                "towers on their media positions only", "plain LM fwd+bwd (the text dims)",
                "towers alone fwd+bwd (the media)", "learner (one copy each) / (plain LM + towers)",
                "towers alone, tower_attention=per_window", "learner, shared prompts, tower_attention=per_window: step",
                "learner, shared prompts: clocked step"):
        assert row in table, row
    assert re.search(r"^losses and gradients finite +yes$", table, re.M)
    (record_file,) = out.glob("learner_tiny_*.json")
    record = json.loads(record_file.read_text())
    assert list(record["ratio"]) == ["learner (one copy each) / bare fwd+bwd, step time"]
    assert record["ratio"]["learner (one copy each) / bare fwd+bwd, step time"] == record["unshared_over_bare"]
    assert record["problems"] == []
    assert record["plain_lm"]["non_embedding_params"] > 0 and all(math.isfinite(x) for x in record["plain_lm"]["loss"])
    assert record["learner_over_yardstick"] > 0
    for path in ("bare", "shared", "unshared"):
        assert record[path]["flops"] > 0 and record[path]["seconds"] > 0
    # the arm ran the same work with the towers per window; every run has its clocked phases
    (arm,) = record["arms"]
    assert arm["name"] == "shared prompts, tower_attention=per_window" and arm["input_tokens"] == record["shared"]["input_tokens"]
    for run in (record["shared"], arm, record["unshared"]):
        assert run["phases"]["optimizer step (clipping, update, schedule)"] > 0
        assert sum(run["phases"].values()) == pytest.approx(run["clocked_s"], rel=0.25)
    # the shared path computes each prompt once per micro-batch: fewer language-model tokens
    assert record["shared"]["input_tokens"] < record["unshared"]["input_tokens"]


def test_bench_colocated_runs(tmp_path: Path) -> None:
    lines, out = run_benchmark("bench_colocated.py", ["--cpu", "--layout", "tiny", "--steps", "2"], tmp_path)
    assert lines[-1].startswith("weight transfer / bare device copy")
    assert "loss / grad norm (last step)" in "\n".join(lines)
    record = json.loads((out / "colocated_tiny.json").read_text())
    assert record["medians"]["timing/step_s"] > 0


def test_bench_every_input_prints_each_type_and_the_ratio(tmp_path: Path) -> None:
    lines, out = run_benchmark("bench_every_input.py", ["--cpu"], tmp_path)
    assert lines[-1].startswith("video_audio / text time")
    assert float(lines[-1].split()[-1]) > 0
    record = json.loads((out / "every_input.json").read_text())
    per_type = record["per_type"]
    assert list(per_type) == ["text", "image", "audio", "image_audio", "video", "video_audio"]
    # float32 on the CPU: vLLM and the learner agree on every type's tokens, and to rounding on
    # the log-probs except where vLLM's video-with-sound positions differ (see the README's Data)
    assert all(row["prompt_ids_equal"] for row in per_type.values()), per_type
    assert all(row["max_abs_logprob_gap"] < 1e-4 for kind, row in per_type.items() if kind != "video_audio"), per_type
    # media make prompts longer than the text alone, and video with its sound longest
    tokens = {kind: row["prompt_tokens"] for kind, row in per_type.items()}
    assert tokens["video_audio"] > tokens["video"] and tokens["image_audio"] > tokens["image"] > 0
