"""Colocated placement on CPUs: engine i and learner rank i share a bundle and the weights move
through the node's shared memory (Ray's object store) instead of a gloo broadcast.

Same seed, same math: the colocated run samples the same completions at every step and ends
with the same weights as the split run, bit for bit (the CPU runs are deterministic,
docs/ENVIRONMENT.md). A killed colocated actor is handled as in the split layout.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from safetensors.torch import load_file
from test_reliability_cpu import drawn_ids, expected_ids, run_in_thread, wait_for_step
from test_train_e2e_cpu import tiny_config

from orchestrator.checkpoint import latest_checkpoint, list_checkpoints
from orchestrator.paths import with_absolute_paths
from orchestrator.trainer import Batch, Trainer, prepare, train
from watch.jsonl import read_metrics

ONE_PAIR = ("learner.num_ranks=1", "rollout.num_engines=1")


class RecordingTrainer(Trainer):
    """The real trainer, keeping what each step's rollout returned."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.completions: list[list[list[int]]] = []

    def _learn(self, batch: Batch, scored) -> dict[str, float]:
        self.completions.append([c.token_ids for r in batch.results for c in r.completions])
        return super()._learn(batch, scored)


def run(config) -> tuple[RecordingTrainer, dict]:
    plan, data = prepare(with_absolute_paths(config), console=False)
    trainer = RecordingTrainer(plan, data, console=False)
    try:
        trainer.start()
        return trainer, trainer.run()
    finally:
        trainer.shutdown()


def weights(run_dir) -> dict:
    folder = latest_checkpoint(run_dir)
    assert folder is not None
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


# with a reward that has signal on a random model (test_train_e2e_cpu's): the task's rewards give
# every completion 0 there, and without an advantage LoRA's merged weights stay the starting ones
# (weight decay moves a full fine-tune's, but B stays 0)
LORA = ("learner.lora.rank=4", "learner.lora.alpha=8", "learner.lr=1e-3", "rewards.weights={test_vowel_share: 1.0}")


# Qwen3-Omni (the second model family, tests/test_qwen3_omni_cpu.py): adapters on the attention
# projections (its MLPs are experts, fused 3-D tensors, pushed whole and merged into nothing)
QWEN3_LORA = (*LORA, "learner.lora.targets=[q_proj,k_proj,v_proj,o_proj]")


@pytest.mark.parametrize(("model", "learner"), [("tiny_checkpoint", ()), ("tiny_checkpoint", LORA), ("qwen3_checkpoint", QWEN3_LORA)],
                         ids=["full", "lora", "qwen3-lora"])
def test_colocated_equals_split_completions_and_weights(ray_local, request, synth_dir, tmp_path, model, learner) -> None:
    """With LoRA too: both transports carry the merged weights, computed the same way; and for
    Qwen3-Omni's mixture of experts (that the engine matches the learner after a push is
    tests/test_qwen3_omni_cpu.py's)."""
    tiny_checkpoint = request.getfixturevalue(model)
    common = (*ONE_PAIR, "total_steps=3", "checkpoint.every=0", "sampling.max_new_tokens=12", *learner)
    split, _ = run(tiny_config(tiny_checkpoint, synth_dir, tmp_path / "split", *common, "placement.mode=split"))
    colocated, summary = run(tiny_config(tiny_checkpoint, synth_dir, tmp_path / "colo", *common, "placement.mode=colocated"))
    assert summary["finished"]
    placement = json.loads((tmp_path / "colo" / "placement.json").read_text())
    assert placement["mode"] == "colocated" and placement["shared"][0]["engine"] == 0
    assert placement["shared"][0]["learner_rank"] == 0
    assert len(colocated.completions) == 3
    assert colocated.completions == split.completions  # every step after step 1 ran on pushed weights
    a, b = weights(tmp_path / "split"), weights(tmp_path / "colo")
    assert sorted(a) == sorted(b)
    changed = [name for name in a if not a[name].equal(b[name])]
    assert not changed, changed[:5]
    start = load_file(str(next(tiny_checkpoint.glob("*.safetensors"))))
    assert any(not start[n].equal(a[n]) for n in start if n in a)  # the weights did move
    assert (latest_checkpoint(tmp_path / "colo") / "adapter").is_dir() == bool(learner)


def test_a_killed_colocated_engine_is_restarted(ray_local, tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, *ONE_PAIR, "placement.mode=colocated", "total_steps=4",
                         "checkpoint.every=0", "sync.timeout_s=30")
    thread, box = run_in_thread(config)
    wait_for_step(out, 2, thread)
    os.kill(json.loads((out / "placement.json").read_text())["engines"][0]["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert drawn_ids(out) == expected_ids(synth_dir / "train" / "omni_rl_format_train.json", 4)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["faults/engine_restarts"] == 1


def test_a_learner_rank_killed_during_a_handoff_restarts_the_run(
    ray_local, tiny_checkpoint, synth_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("ECHOINK_FAILPOINTS", "learner.push@3=kill")  # the push after step 2
    out = tmp_path / "run"
    config = tiny_config(tiny_checkpoint, synth_dir, out, *ONE_PAIR, "placement.mode=colocated", "total_steps=2",
                         "checkpoint.every=1", "faults.max_restarts=1", "sync.timeout_s=60")
    summary = train(config, console=False)
    assert summary["finished"] and summary["restarts"] == 1
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]


def test_colocation_needs_pairs_and_no_overlap() -> None:
    from orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rollout.num_engines \(2\) must not exceed learner.num_ranks \(1\)"):
        load_config(None, ["placement.mode=colocated", "rollout.num_engines=2"])
    with pytest.raises(ConfigError, match="grpo.off_policy"):
        load_config(None, ["placement.mode=colocated", "grpo.off_policy=true"])
