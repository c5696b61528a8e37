"""End to end on the CPU: `echoink train` on the tiny model with real vLLM, Ray and DeepSpeed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from chromium import open_page

from echoink.cli import main
from omni.metric_table import unknown
from orchestrator.checkpoint import list_checkpoints, read_run_state
from orchestrator.config import load_config
from orchestrator.trainer import train
from rewards import register_reward
from watch.jsonl import read_metrics
from watch.samples import read_samples

REQUIRED_KEYS = (
    "step",
    "reward/accuracy",
    "reward/format",
    "reward/total",
    "completion_length/mean",
    "kl",
    "grad_norm",
    "lr",
    "timing/rollout_s",
    "timing/learn_s",
    "timing/weight_sync_s",
    "timing/step_s",
    "throughput/rollout_tokens_per_s",
    "mismatch/token_prob_error",
)


def tiny_config(checkpoint: Path, data: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            f"model_path={checkpoint}",
            f"output_dir={out}",
            f"data.train={data / 'train' / 'omni_rl_format_train.json'}",
            f"data.valid={data / 'valid' / 'omni_rl_format_valid.json'}",
            "total_steps=4",
            "grpo.group_size=4",
            "grpo.questions_per_step=2",
            "sampling.max_new_tokens=16",
            "rollout.max_model_len=1024",
            "rollout.enforce_eager=true",
            "rollout.cpus_per_engine=1",
            "learner.num_ranks=2",
            "learner.zero_stage=2",
            "learner.micro_batch_size=4",
            "learner.lr=1e-4",
            "learner.gradient_checkpointing=false",
            "sync.bucket_mb=1",
            "checkpoint.every=2",
            "checkpoint.keep_last=3",
            "eval.at_end=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tiny_checkpoint, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-full")
    config = tiny_config(tiny_checkpoint, synth_dir, out, "eval.at_end=true", "eval.at_start=true", "eval.ablate=[none,audio]",
                         "log.samples_every=2")
    summary = train(config, console=False)
    return out, summary


def test_run_folder_has_metrics_checkpoint_and_tensorboard(uninterrupted) -> None:
    out, summary = uninterrupted
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in REQUIRED_KEYS:
            assert key in row, key
            assert isinstance(row[key], int | float) and math.isfinite(row[key]), (key, row[key])
        assert row["timing/step_s"] >= row["timing/learn_s"] > 0
        assert unknown(set(row) - {"step", "time"}) == [], "metric names missing from omni/metric_table.py's table"
        assert 0 <= row["reward/format"] <= 1 and row["completion_length/mean"] <= 16
    # what policy_loss computes reaches the run (it used to be dropped on the way)
    assert all(r["ratio/min"] <= r["ratio/mean"] <= r["ratio/max"] for r in rows)
    assert rows[0]["lr"] == pytest.approx(1e-4)  # cosine starts at the base rate
    assert rows[-1]["lr"] < rows[0]["lr"]
    streak = 0  # consecutive steps in which no group had two different rewards
    for row in rows:
        streak = streak + 1 if row["reward/zero_advantage_groups"] == 1.0 else 0
        assert row["reward/no_signal_steps"] == streak
    checkpoints = list_checkpoints(out)
    assert [s for s, _ in checkpoints] == [2, 4]
    final = checkpoints[-1][1]
    assert summary["checkpoint"] == str(final) and summary["finished"]
    assert read_run_state(final)["step"] == 4 and read_run_state(final)["sampler"]["drawn"] == 8
    assert (final / "model.safetensors").is_file() and (final / "train_state").is_dir()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    placement = json.loads((out / "placement.json").read_text())
    assert len(placement["engines"]) == 1 and len(placement["learner_ranks"]) == 2
    evaluation = json.loads((out / "eval" / "final" / "summary.json").read_text())
    assert set(evaluation["conditions"]) == {"none", "audio"} and evaluation["questions"] == 12
    # eval.at_start: the starting weights on the same questions, and the paired gain in the summary
    start = json.loads((out / "eval" / "start" / "summary.json").read_text())
    assert start["questions"] == 12
    gain = summary["eval_gain"]
    assert gain["accuracy_start"] == pytest.approx(start["accuracy"])
    assert gain["accuracy_end"] == pytest.approx(evaluation["accuracy"])
    assert gain["questions"] == 12 and 0 <= gain["mcnemar_p"] <= 1
    # wins and losses are the discordant pairs of the two results files
    def right(folder: str) -> dict[str, bool]:
        rows = [json.loads(x) for x in (out / "eval" / folder / "results.jsonl").read_text().splitlines()]
        return {r["id"]: r["correct"] >= 0.5 for r in rows if r["condition"] == "none"}

    before, after = right("start"), right("final")
    assert gain["wins"] == sum(after[q] and not before[q] for q in before)
    assert gain["losses"] == sum(before[q] and not after[q] for q in before)
    assert summary["eval_start"]["eval/accuracy"] == pytest.approx(start["accuracy"])


def test_samples_and_the_report_of_the_run_in_chromium(uninterrupted, tmp_path) -> None:
    """log.samples_every=2 samples steps 1, 2 and 4 (4 completions: round robin over the step's 2
    questions); `echoink report` on the run folder renders in headless Chromium with every chart and
    picture loaded and every clip decoded."""
    out, _ = uninterrupted
    samples = read_samples(out)
    assert [(r["step"], r["slot"]) for r in samples] == [(s, k) for s in (1, 2, 4) for k in range(4)]
    drawn = {row["step"]: row["ids"] for row in map(json.loads, (out / "questions.jsonl").read_text().splitlines())}
    for row in samples:
        assert (row["id"], row["completion_index"]) == (drawn[row["step"]][row["slot"] % 2], row["slot"] // 2)
        group = torch.tensor(row["group_rewards"], dtype=torch.float64)  # the 4 completions of its question
        assert len(group) == 4 and group[row["completion_index"]] == row["reward"] == sum(row["rewards"].values())
        expected = (row["reward"] - group.mean()) / (group.std() + 1e-4)  # grpo.advantage grpo
        assert row["advantage"] == pytest.approx(float(expected), abs=1e-9)
        assert (out / row["image"]).is_file() and (out / row["audio"]).is_file()
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    final = json.loads((out / "eval" / "final" / "summary.json").read_text())
    assert f"none: as given</td><td>{final['accuracy']:.3f}</td>" in page
    seen = open_page(out / "report.html", tmp_path)
    assert {"Training curves", "After training (eval/final)", "Before and after training", "Step 1", "Step 2",
            "Step 4"} <= set(seen["headings"])
    pictures = [i for i in seen["images"] if i["alt"] == "the question's picture"]
    assert len(pictures) == len(samples) and len(seen["images"]) > len(samples)  # and the charts
    assert all(i["loaded"] for i in seen["images"]), seen["images"]
    assert len(seen["audio"]) == len(samples)
    for audio in seen["audio"]:
        assert audio["error"] is None and audio["src"].startswith("data:audio/wav;base64,"), audio
        assert audio["duration"] == pytest.approx(2.0, abs=0.01)  # avqa.synth's default 2-second clips


def test_checkpoint_loads_in_transformers(uninterrupted) -> None:
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    out, summary = uninterrupted
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(summary["checkpoint"])
    assert sum(p.numel() for p in model.parameters()) > 100_000


def test_resume_draws_the_same_questions(ray_local, tiny_checkpoint, synth_dir, tmp_path, uninterrupted) -> None:
    full, _ = uninterrupted
    out = tmp_path / "run"
    first = train(tiny_config(tiny_checkpoint, synth_dir, out), console=False, stop_after=3)
    assert first["steps"] == 3 and not first["finished"]
    # a step done after the last checkpoint (step 3 is saved on stop; step 2 is the periodic one)
    second = train(tiny_config(tiny_checkpoint, synth_dir, out), console=False, resume=True)
    assert second["steps"] == 4 and second["finished"]

    def ids(folder: Path) -> list[tuple[int, list[str]]]:
        rows = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]
        return [(r["step"], r["ids"]) for r in rows]

    assert ids(out) == ids(full)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


@register_reward("test_vowel_share")  # registered once per process: both parametrizations share it
def vowel_share(text, record, options) -> float:
    letters = [ch for ch in text.lower() if ch.isalpha()]
    return sum(ch in "aeiou" for ch in letters) / len(letters) if letters else 0.0


@pytest.mark.parametrize("off_policy", [False, True], ids=["on-policy", "one-step-off-policy"])
def test_policy_climbs_a_reward_it_can_reach(ray_local, tiny_checkpoint, synth_dir, tmp_path, off_policy) -> None:
    """Reward: the share of vowels among the completion's letters; GRPO must raise it, on-policy and
    with the rollout of step t+1 overlapping the learning of step t (importance-weighted)."""
    config = tiny_config(
        tiny_checkpoint,
        synth_dir,
        tmp_path / "climb",
        "total_steps=16",
        "grpo.group_size=8",
        "grpo.questions_per_step=4",
        "grpo.beta=0.0",
        "learner.lr=2e-2",
        "learner.lr_schedule=constant",
        "rewards.weights={test_vowel_share: 1.0}",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        f"grpo.off_policy={str(off_policy).lower()}",
    )
    train(config, console=False)
    rows = read_metrics(tmp_path / "climb" / "metrics.jsonl")
    first = sum(r["reward/test_vowel_share"] for r in rows[:4]) / 4
    last = sum(r["reward/test_vowel_share"] for r in rows[-4:]) / 4
    # measured on-policy: ~0.37 over the first four steps, ~0.75 over the last four
    assert last > first + 0.15, (first, last)
    if not off_policy:  # off-policy the sampler is one update behind: the gap is the lag, by design
        assert all(r["mismatch/token_prob_error"] < 1e-3 for r in rows)
    questions = [json.loads(line)["ids"] for line in (tmp_path / "climb" / "questions.jsonl").read_text().splitlines()]
    assert len(questions) == 16  # off-policy draws the same batches, one step ahead
