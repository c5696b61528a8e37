"""Evaluation: values against a hand count, the four ablation conditions, compare and plot."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image
from test_train_e2e_cpu import tiny_config

from echoink.cli import main
from evaluation.results import compare
from evaluation.stats import is_reflective, mcnemar, wilson_interval

ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)  # the reference's parser, written here again
FORMAT = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)


@pytest.fixture(scope="module")
def eval_dir(ray_local, tiny_checkpoint, synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    config = tiny_config(tiny_checkpoint, synth_dir, out / "run", "eval.ablate=[none]")
    config_file = out / "config.yaml"
    from orchestrator.config import dump_config

    config_file.write_text(dump_config(config))
    code = main(
        ["eval", "--config", str(config_file), "--checkpoint", str(tiny_checkpoint), "--limit", "6",
         "--ablate", "none,audio,image,both", "--out", str(out / "result"), "--set", "sampling.max_new_tokens=12"]
    )
    assert code == 0
    return out / "result"


def test_results_and_summary_match_a_hand_count(eval_dir: Path) -> None:
    rows = [json.loads(line) for line in (eval_dir / "results.jsonl").read_text().splitlines()]
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert len(rows) == 24 and summary["questions"] == 6
    plain = [r for r in rows if r["condition"] == "none"]
    correct = format_ok = 0
    for row in plain:
        assert set(row) >= {"id", "gold", "prediction", "correct", "format_ok", "completion", "tokens"}
        match = ANSWER.search(row["completion"])
        answer = match.group(1).strip() if match else ""
        correct += answer == row["gold"]
        format_ok += bool(FORMAT.fullmatch(row["completion"].strip()))
        assert row["correct"] == float(answer == row["gold"])
        assert 0 < row["tokens"] <= 12
    assert summary["accuracy"] == pytest.approx(correct / 6)
    assert summary["format_rate"] == pytest.approx(format_ok / 6)
    assert summary["mean_completion_length"] == pytest.approx(sum(r["tokens"] for r in plain) / 6)
    lo, hi = wilson_interval(correct, 6)
    assert summary["ci95"] == pytest.approx([lo, hi])
    assert summary["checkpoint"] and summary["config"]["grpo"]["group_size"] == 4


def test_four_ablation_conditions(eval_dir: Path) -> None:
    rows = [json.loads(line) for line in (eval_dir / "results.jsonl").read_text().splitlines()]
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert list(summary["conditions"]) == ["none", "audio", "image", "both"]
    by = {c: {r["id"]: r for r in rows if r["condition"] == c} for c in summary["conditions"]}
    assert all(len(v) == 6 for v in by.values()) and len({frozenset(v) for v in by.values()}) == 1
    for condition in ("audio", "image", "both"):
        changed = sum(by[condition][q]["prediction"] != by["none"][q]["prediction"] for q in by["none"])
        assert summary["conditions"][condition]["answer_changed_rate"] == pytest.approx(changed / 6)
        # greedy decoding of the same model: the media are what changed the completions
        assert any(by[condition][q]["completion"] != by["none"][q]["completion"] for q in by["none"])
        expected = sum(r["correct"] for r in by[condition].values()) / 6
        assert summary["conditions"][condition]["accuracy"] == pytest.approx(expected)


def write_results(folder: Path, outcomes: list[tuple[str, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.jsonl", "w") as fh:
        for qid, right in outcomes:
            fh.write(json.dumps({"id": qid, "condition": "none", "correct": float(right), "gold": "A"}) + "\n")
    return folder


def test_compare_with_a_known_mcnemar_result(tmp_path: Path, capsys) -> None:
    # 30 questions: 15 both right, 3 both wrong, A-only right 10, B-only right 2
    a, b = [], []
    for i in range(30):
        ra, rb = (1, 1) if i < 15 else (0, 0) if i < 18 else (1, 0) if i < 28 else (0, 1)
        a.append((f"q{i}", ra))
        b.append((f"q{i}", rb))
    b.append(("extra", 1))
    fa, fb = write_results(tmp_path / "A", a), write_results(tmp_path / "B", b)
    result = compare(fa, fb)
    assert (result["questions"], result["a_right_b_wrong"], result["a_wrong_b_right"]) == (30, 10, 2)
    assert result["only_in_b"] == 1
    # exact two-sided binomial: 2 · P(X ≤ 2 | n=12, p=½) = 2 · (1 + 12 + 66) / 4096
    assert result["mcnemar"]["p_value"] == pytest.approx(158 / 4096)
    assert result["mcnemar"]["statistic"] == pytest.approx((abs(10 - 2) - 1) ** 2 / 12)
    assert result["accuracy_a"] == pytest.approx(25 / 30) and result["accuracy_b"] == pytest.approx(17 / 30)
    assert main(["compare", str(fa), str(fb), "--json", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    assert "B wins 2, B loses 10" in printed and "exact p = 0.03857" in printed
    assert mcnemar(0, 0)["p_value"] == 1.0 and mcnemar(5, 5)["p_value"] == 1.0


def test_plot_writes_pngs_of_the_asked_size(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 21):
            fh.write(json.dumps({
                "step": step, "reward/accuracy": step / 20, "reward/format": 1.0, "reward/total": 1 + step / 20,
                "completion_length/mean": 100 + 5 * math.sin(step), "kl": 1e-3 * step,
                "timing/rollout_s": 1.0, "timing/learn_s": 2.0, "timing/weight_sync_s": 0.1, "timing/step_s": 3.2,
            }) + "\n")
    assert main(["plot", str(run), "--width", "800", "--height", "500", "--smooth", "3"]) == 0
    pngs = sorted((run / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"training_curves.png", "rewards.png", "kl.png", "timings.png"}
    for png in pngs:
        assert png.stat().st_size > 5000
        with Image.open(png) as img:
            assert img.size == (800, 500)
            assert len(set(img.convert("L").getdata())) > 10  # something was drawn


def test_reflection_detection() -> None:
    assert is_reflective("<think>The shape is red. Wait, the tone is high.</think><answer>B</answer>")
    assert is_reflective("<think>I pick option A. Let me re-evaluate: option C fits.</think><answer>C</answer>")
    assert is_reflective("<think>first option A, then answer is B</think><answer>B</answer>")
    assert not is_reflective("<think>red shape, low tone, so option A</think><answer>A</answer>")
    assert not is_reflective("Wait <answer>A</answer>")  # only the reasoning counts
