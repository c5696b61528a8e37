"""A mixed video recipe learns: `make demo-mixed` end to end — video with its own sound, video
alone and image with sound in one synthetic set, mixed within every step.

Synthetic mixed set → random tiny checkpoint → format-only warm start on that set → GRPO
(configs/tiny_mixed_cpu.yaml) → evaluation with every ablation. The policy must beat its warm start
on the same validation questions beyond the sampling noise, and lose accuracy when the sound is
taken from the questions that have one. (In 110 steps the tiny model learns the pitch, and the
colour a little; not yet the direction of motion: grey frames change no answer. See README.)
"""

from __future__ import annotations

import json
import math

import pytest
from test_demo_learns_cpu import run_make_demo

MIXED = ("image_audio", "video", "video_audio")


def accuracy_on(rows: list[dict], ids: set[str]) -> float:
    chosen = [r["correct"] for r in rows if r["id"] in ids]
    return sum(chosen) / len(chosen)


@pytest.mark.slow
def test_mixed_recipe_beats_its_warm_start(tmp_path) -> None:
    from orchestrator.config import load_config

    run_dir = tmp_path / "run"
    run_make_demo(run_dir, target="demo-mixed")
    config = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    start, gain = summary["eval_start"], summary["eval_gain"]
    n = gain["questions"]
    assert n == 96
    assert start["eval/format_rate"] >= 0.9, start
    noise = 2 * math.sqrt(2 * 0.25 / n)
    assert gain["accuracy_end"] - gain["accuracy_start"] > noise, gain
    assert gain["mcnemar_p"] < 0.01, gain

    final = json.loads((run_dir / "eval" / "final" / "summary.json").read_text())
    plain = final["conditions"]["none"]
    assert sorted(plain["by_type"]) == list(MIXED)  # every type was asked, none failed
    assert plain["errors"] == 0 and all(t["questions"] >= 24 for t in plain["by_type"].values()), plain["by_type"]
    # a condition asks only the questions that have its medium
    conditions = final["conditions"]
    assert conditions["video"]["questions"] == plain["by_type"]["video"]["questions"] + plain["by_type"]["video_audio"]["questions"]
    assert conditions["image"]["questions"] == plain["by_type"]["image_audio"]["questions"]
    assert conditions["video"]["not_applicable"] == n - conditions["video"]["questions"]
    rows = [json.loads(line) for line in (run_dir / "eval" / "final" / "results.jsonl").read_text().splitlines()]
    by_condition = {c: [r for r in rows if r["condition"] == c] for c in conditions}
    with_sound = {r["id"] for r in by_condition["audio"]}
    # the sound is read, in both kinds that have one: silence costs accuracy on the same questions
    assert accuracy_on(by_condition["audio"], with_sound) < accuracy_on(by_condition["none"], with_sound) - noise / 2, conditions
    everything = {r["id"] for r in by_condition["both"]}
    assert accuracy_on(by_condition["both"], everything) < accuracy_on(by_condition["none"], everything), conditions

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == config.total_steps
    assert all(m["rollout/failed_questions"] == 0 for m in metrics)
