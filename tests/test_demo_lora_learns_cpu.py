"""LoRA learns the demo: `make demo-lora` itself — the demo's recipe (configs/tiny_cpu.yaml, the
same data, random checkpoint and warm start, which `make demo` built already in this session)
with rank-16 adapters on the language model — must beat its warm start on the same validation
questions by more than the sampling noise, keep the answer format, and leave a checkpoint that is
the plain thinker plus peft's adapter folder.
"""

from __future__ import annotations

import json
import math

import pytest
from test_demo_learns_cpu import run_make_demo


@pytest.mark.slow
def test_lora_recipe_beats_its_warm_start(tmp_path) -> None:
    from orchestrator.checkpoint import list_checkpoints
    from orchestrator.config import load_config

    run_dir = tmp_path / "run"
    output = run_make_demo(run_dir, target="demo-lora")
    assert "LoRA rank 16 alpha 32" in output and "reference = adapters off" in output  # the plan said so

    config = load_config(run_dir / "config.yaml")
    assert config.learner.lora.rank == 16 and config.output_dir == run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    start, end, gain = summary["eval_start"], summary["eval"], summary["eval_gain"]
    n = gain["questions"]
    assert n == 64 and start["eval/accuracy"] <= 0.45, start
    noise = 2 * math.sqrt(2 * 0.25 / n)  # two standard errors of a difference of two accuracies at p = 0.5
    assert gain["accuracy_end"] - gain["accuracy_start"] > noise, gain
    assert gain["mcnemar_p"] < 0.01, gain
    assert end["eval/format_rate"] >= 0.9, end

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == config.total_steps
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert max(r["kl"] for r in rows) > 0.0  # the adapters moved the policy off the reference
    last = list_checkpoints(run_dir)[-1][1]
    assert (last / "model.safetensors").is_file() and (last / "adapter" / "adapter_model.safetensors").is_file()
    adapter = json.loads((last / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32
