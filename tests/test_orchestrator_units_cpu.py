"""Run config, question sampler and checkpoint bookkeeping (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator import checkpoint as ckpt
from orchestrator.config import ConfigError, RunConfig, dump_config, load_config
from orchestrator.sampler import QuestionSampler


def test_defaults_are_the_reference_run() -> None:
    c = RunConfig()
    assert (c.grpo.group_size, c.grpo.questions_per_step, c.grpo.beta, c.grpo.kl_estimator) == (16, 8, 0.001, "k3")
    assert (c.learner.lr, c.learner.weight_decay, c.learner.grad_clip, c.learner.lr_schedule) == (1e-6, 0.01, 5.0, "cosine")
    assert (c.sampling.temperature, c.sampling.top_p, c.sampling.max_new_tokens) == (1.0, 0.95, 768)
    assert c.rewards.weights == {"accuracy": 1.0, "format": 1.0}
    assert c.steps_for(4490) == 562  # one epoch of AVQA-R1-6K at 8 questions per step


def test_yaml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("total_steps: 7\ngrpo:\n  group_size: 4\nlearner:\n  lr: 1.0e-5\n")
    c = load_config(path, ["grpo.group_size=8", "rewards.weights={accuracy: 2.0}", "system_prompt=null"])
    assert (c.total_steps, c.grpo.group_size, c.learner.lr, c.rewards.weights) == (7, 8, 1e-5, {"accuracy": 2.0})
    assert load_config(None, ["output_dir=runs/x"]).output_dir == Path("runs/x")
    assert load_config(path).model_dump() == load_config(_roundtrip(tmp_path, load_config(path))).model_dump()


def _roundtrip(tmp_path: Path, config: RunConfig) -> Path:
    out = tmp_path / "dumped.yaml"
    out.write_text(dump_config(config))
    return out


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["grpo.groupsize=4"], "grpo.groupsize", "unknown key"),
        (["nope=1"], "nope", "unknown key"),
        (["grpo.group_size=1"], "grpo.group_size", "greater than or equal to 2"),
        (["learner.lr=nan"], "learner.lr", ""),
        (["grpo.beta=.nan"], "grpo.beta", ""),
        (["sampling.top_p=1.5"], "sampling.top_p", "less than or equal to 1"),
        (["learner.zero_stage=1"], "learner.zero_stage", ""),
        (["rollout.num_engines=-2"], "rollout.num_engines", "greater than or equal to 1"),
        (["media.max_pixels=10"], "media", "max_pixels"),
        (["rewards.weights={accuracy: 1, bogus: 1}"], "rewards.weights", "unknown reward"),
        (["learner.lr=fast"], "learner.lr", "valid number"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert f"  {key}:" in str(info.value) and words in str(info.value)


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["grpo.group_size"])


def test_sampler_covers_each_epoch_and_resumes() -> None:
    s = QuestionSampler(10, seed=3)
    first = [s.next(4) for _ in range(5)]  # 20 draws = two epochs
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new order per epoch
    again = QuestionSampler(10, seed=3)
    again.next(4)
    again.next(4)
    resumed = QuestionSampler(10, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    assert [resumed.next(4) for _ in range(3)] == first[2:]
    assert QuestionSampler(10, seed=4).next(10) != first[0] + first[1][:6]


def test_checkpoints_are_atomic_and_pruned(tmp_path: Path) -> None:
    def writer(content: str):
        def write(folder: Path) -> None:
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_text(content)

        return write

    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, writer(f"w{step}"), {"step": step}, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]

    def broken(folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path, 4, broken, {"step": 4}, keep_last=2)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-000003"
    assert (latest / "model.safetensors").read_text() == "w3"
    assert not list(ckpt.checkpoint_dir(tmp_path).glob(".tmp-*"))
    # a folder without run_state.json (a kill before the rename) never counts
    (ckpt.checkpoint_dir(tmp_path) / "step-000009").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000003"


def test_warm_start_targets_teach_the_format_not_the_answer(train_json: Path) -> None:
    import random
    from collections import Counter

    from avqa import load_records
    from avqa.synth import COLOURS, TONES_HZ
    from echoink.warmstart import REASONING, target_text
    from rewards.functions import format_reward

    record = load_records(train_json)[0]
    rng = random.Random(0)
    texts = [target_text(record, rng) for _ in range(4000)]
    assert all(format_reward(t) == 1.0 for t in texts)
    letters = Counter(t[t.index("<answer>") + 8] for t in texts)
    assert set(letters) == set(record.letters)
    assert all(0.2 < count / len(texts) < 0.3 for count in letters.values()), letters
    # the reasoning names no option letter and no colour or pitch
    words = set(REASONING.lower().split())
    assert not words & {letter.lower() for letter in record.letters}
    assert not words & (set(COLOURS) | {w for tone in TONES_HZ for w in tone.split()})


def test_warm_start_refuses_to_overwrite_a_checkpoint(tmp_path: Path, train_json: Path, capsys) -> None:
    from echoink.cli import main

    out = tmp_path / "warm"
    out.mkdir()
    (out / "config.json").write_text("{}")
    code = main(["model", "warmstart", "--model", str(tmp_path / "m"), "--data", str(train_json), "--out", str(out)])
    assert code == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
