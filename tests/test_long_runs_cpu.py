"""Long runs are exact: a run stopped with --stop-after-steps and resumed, or restarted after a
learner rank dies, trains as if it never stopped — the same questions at every step, the same
``kl`` and ``loss``, the same final weights (CPU runs are deterministic: equal to 1e-7).

Each run keeps one checkpoint (``keep_last 1``, one every step): the checkpoint a run resumed from
is pruned while it trains, and the KL is still measured against the run's starting model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_e2e_cpu import tiny_config

from orchestrator.checkpoint import list_checkpoints
from orchestrator.trainer import train
from watch.jsonl import read_jsonl, read_metrics

STEPS = 4
EXACT = ("checkpoint.every=1", "checkpoint.keep_last=1", "faults.collective_timeout_s=120", "sync.timeout_s=120")


def config(checkpoint: Path, data: Path, out: Path, *extra: str):
    return tiny_config(checkpoint, data, out, f"total_steps={STEPS}", *EXACT, *extra)


def questions(run: Path) -> list[tuple[int, list[str]]]:
    return [(row["step"], row["ids"]) for row in read_jsonl(run / "questions.jsonl")]


def curve(run: Path) -> list[tuple[int, float, float]]:
    return [(row["step"], row["kl"], row["loss"]) for row in read_metrics(run / "metrics.jsonl")]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    [(step, folder)] = list_checkpoints(run)  # keep_last 1: only the final one is left
    assert step == STEPS
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    assert weights, f"{folder}: no weights"
    return weights


def assert_same_run(a: Path, b: Path) -> None:
    assert questions(b) == questions(a)
    curve_a, curve_b = curve(a), curve(b)
    assert [s for s, _, _ in curve_b] == list(range(1, STEPS + 1))
    assert any(kl != 0 for _, kl, _ in curve_a[1:])  # the KL term is live (beta > 0), so a wrong reference shows
    for (step, kl_a, loss_a), (_, kl_b, loss_b) in zip(curve_a, curve_b, strict=True):
        assert kl_b == pytest.approx(kl_a, abs=1e-7), f"step {step}: kl"
        assert loss_b == pytest.approx(loss_a, abs=1e-7), f"step {step}: loss"
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    assert worst <= 1e-7, f"final weights differ by {worst}"


@pytest.fixture(scope="module", params=["on-policy", "off-policy"])
def straight(request, ray_local, tiny_checkpoint, synth_dir, tmp_path_factory):
    extra = ("grpo.off_policy=true",) if request.param == "off-policy" else ()
    out = tmp_path_factory.mktemp(f"straight-{request.param}")
    summary = train(config(tiny_checkpoint, synth_dir, out, *extra), console=False)
    assert summary["finished"]
    return out, extra


def test_stopped_and_resumed_trains_as_the_straight_run(straight, tiny_checkpoint, synth_dir, tmp_path) -> None:
    reference, extra = straight
    out = tmp_path / "pieces"
    first = train(config(tiny_checkpoint, synth_dir, out, *extra), console=False, stop_after=2)
    assert not first["finished"] and first["steps"] == 2
    state = json.loads((list_checkpoints(out)[-1][1] / "run_state.json").read_text())
    assert (state["pending"] is not None) == bool(extra)  # one step off: the next rollout is kept
    second = train(config(tiny_checkpoint, synth_dir, out, *extra), console=False, resume=True)
    assert second["finished"] and second["steps"] == STEPS
    assert_same_run(reference, out)


# on policy only: a restart resumes through the same path as --resume (tested both ways above),
# and each of these runs costs two minutes of CI
@pytest.mark.parametrize("straight", ["on-policy"], indirect=True)
def test_restart_after_a_learner_kill_trains_as_the_straight_run(
    straight, tiny_checkpoint, synth_dir, tmp_path, monkeypatch
) -> None:
    reference, extra = straight
    # both ranks die inside their 4th push (the one after step 3, before its checkpoint): the run
    # restarts from step 2's checkpoint and trains steps 3 and 4 again
    monkeypatch.setenv("ECHOINK_FAILPOINTS", "learner.push@4=kill")
    out = tmp_path / "restarted"
    summary = train(config(tiny_checkpoint, synth_dir, out, "faults.max_restarts=1", *extra), console=False)
    assert summary["finished"] and summary["restarts"] == 1
    assert_same_run(reference, out)
