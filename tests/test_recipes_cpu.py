"""Every recipe of configs/recipes/ trains 3 steps of the tiny CPU config (one shared Ray cluster),
and the reference recipe is RunConfig's defaults."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestrator.config import GRPOConfig, load_config
from orchestrator.trainer import train
from watch.jsonl import read_metrics

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def test_the_reference_recipe_is_the_default() -> None:
    assert load_config(None, recipe=REPO / "configs" / "recipes" / "echoink_r1.yaml").grpo == GRPOConfig()
    assert {p.stem for p in RECIPES} >= {"echoink_r1", "dapo", "dr_grpo", "gspo"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_three_steps(ray_local, tiny_checkpoint, synth_dir, tmp_path, recipe: Path) -> None:
    out = tmp_path / "run"
    config = load_config(
        None,
        [
            f"model_path={tiny_checkpoint}", f"output_dir={out}",
            f"data.train={synth_dir / 'train' / 'omni_rl_format_train.json'}", "data.valid=null",
            "total_steps=3", "grpo.group_size=4", "grpo.questions_per_step=2", "sampling.max_new_tokens=16",
            "rollout.max_model_len=1024", "rollout.enforce_eager=true", "learner.num_ranks=1",
            "learner.zero_stage=2", "learner.micro_batch_size=4", "learner.lr=1e-4",
            "learner.gradient_checkpointing=false", "checkpoint.every=0", "checkpoint.at_end=false",
            "eval.at_end=false",
        ],
        recipe=recipe,
    )
    summary = train(config, console=False)
    assert summary["finished"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]), row
        if config.grpo.mini_batches > 1:  # the second mini-batch learns against the policy before the first update
            assert row["ratio/max"] != 1.0 or row["ratio/min"] != 1.0
