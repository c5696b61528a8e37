"""The embedded default learns the task: `make demo`'s recipe, end to end, on the demo's sizes.

Synthetic data (56-pixel images, 1-second tones) → random tiny checkpoint → supervised warm start
(format only, random letter) → GRPO with the real rewards (configs/tiny_cpu.yaml) → evaluation
with the modality ablation. The trained policy must beat its own warm start on the same
validation questions by more than the sampling noise of that many questions, and lose accuracy
when either medium is taken away.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_recipe_beats_its_warm_start(ray_local, tmp_path) -> None:
    from avqa.synth import DEMO_SPEC, synth_dataset
    from omni.tiny import build_tiny_checkpoint
    from orchestrator.config import load_config
    from orchestrator.trainer import train
    from orchestrator.warmstart import warm_start

    data = tmp_path / "data"
    synth_dataset(data, train=256, val=64, seed=0, spec=DEMO_SPEC)
    tiny = build_tiny_checkpoint(tmp_path / "tiny", seed=0)
    warm = warm_start(tiny, data / "train" / "omni_rl_format_train.json", tmp_path / "warm", console=False)
    assert warm["nll_last"] < 0.5 * warm["nll_first"], warm  # the format was learnt

    config = load_config(
        REPO / "configs" / "tiny_cpu.yaml",
        [
            f"model_path={tmp_path / 'warm'}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={data / 'train' / 'omni_rl_format_train.json'}",
            f"data.valid={data / 'valid' / 'omni_rl_format_valid.json'}",
            "checkpoint.every=0",
            "eval.every=0",
        ],
    )
    summary = train(config, console=False)
    start, end, gain = summary["eval_start"], summary["eval"], summary["eval_gain"]
    n = gain["questions"]
    assert n == 64
    # after the warm start: the format, not the answer
    assert start["eval/format_rate"] >= 0.9, start
    assert start["eval/accuracy"] <= 0.45, start
    # sampling noise of a difference of two accuracies on n questions: two standard errors at p = 0.5
    noise = 2 * math.sqrt(2 * 0.25 / n)
    assert gain["accuracy_end"] - gain["accuracy_start"] > noise, gain
    assert gain["mcnemar_p"] < 0.01, gain
    # both media are used: taking either away costs accuracy
    assert end["eval/ablate_audio/accuracy"] < end["eval/accuracy"], end
    assert end["eval/ablate_image/accuracy"] < end["eval/accuracy"], end
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == config.total_steps
    assert sum(r["reward/format"] for r in rows[-10:]) / 10 > 0.8  # the format survived the training
