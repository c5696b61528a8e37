"""`echoink report RUN_DIR` on a run folder written by the run's own writers (metrics rows, the
evaluation summaries of `evaluation.evaluate.summarise`, the paired gain of `gain_summary`, the
samples of `SampleLog` on real synthetic records), opened in a real headless Chromium; and the
page's answers for folders that lack parts. The same page built from a real training run is
checked in tests/test_train_e2e_cpu.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from chromium import open_page

from avqa import load_audio, load_records
from echoink.cli import main
from evaluation.evaluate import EvalSettings, summarise
from omni.inputs import MediaSettings
from orchestrator.config import RunConfig, dump_config
from orchestrator.scoring import ScoringRules, score_step
from rewards import RewardSet
from rollout.types import Completion, RolloutResult
from watch.report import build_report, choose_steps, render_report
from watch.samples import SampleLog, read_samples

# greedy correctness of 8 validation questions: before, after, after with the audio silenced
START = [1, 0, 0, 0, 1, 0, 0, 0]
FINAL = [1, 1, 1, 1, 1, 1, 0, 0]
FINAL_NO_AUDIO = [1, 0, 1, 0, 1, 0, 0, 0]


def write_eval(folder: Path, conditions: dict[str, list[int]]) -> None:
    settings = EvalSettings(ablate=tuple(conditions))
    rows, per_condition = [], {}
    for condition, correct in conditions.items():
        part = [{"id": f"v{i}", "condition": condition, "gold": "A", "prediction": "A" if c else "B",
                 "correct": float(c), "correct_reward": float(c), "correct_lenient": float(c), "format_ok": 1.0,
                 "tokens": 18.0, "cut": 0.0, "reflective": 0.0} for i, c in enumerate(correct)]
        per_condition[condition] = summarise(part, settings, None if condition == "none" else {"v0": "A"})
        rows += part
    summary = {"protocol": {"name": "fair"}, "mode": "greedy", "samples": 1, "conditions": per_condition,
               **{k: per_condition["none"][k] for k in ("accuracy", "ci95", "format_rate", "questions")},
               "mean_completion_length": per_condition["none"]["mean_completion_length"]}
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps(summary))


def write_samples(run: Path, train_json: Path, steps: range) -> None:
    records = load_records(train_json)[:2]
    log = SampleLog(run, every=1, count=2, media=MediaSettings())
    for step in steps:
        results = [RolloutResult(r.id, completions=[
            Completion(f"<think>step {step}</think><answer>{r.answer}</answer>", [1, 2, 3], [-0.1] * 3, "stop"),
            Completion("no idea", [1], [-0.1], "stop")]) for r in records]
        log.log(step, score_step(step, records, results, RewardSet(), ScoringRules()).completions)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, train_json) -> Path:
    from evaluation.results import gain_summary

    run = tmp_path_factory.mktemp("run")
    rows = [{"step": s, "time": 1.7e9 + s, "reward/total": 0.5 + s / 40, "reward/accuracy": s / 20,
             "reward/format": 1.0, "completion_length/mean": 18.0, "kl": 0.001 * s, "timing/step_s": 1.5}
            for s in range(1, 21)]
    rows[9]["eval/accuracy"] = 0.5
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text(dump_config(RunConfig()))
    (run / "placement.json").write_text(json.dumps({"mode": "split", "engines": [{"node": "n0"}]}))
    write_eval(run / "eval" / "start", {"none": START})
    write_eval(run / "eval" / "final", {"none": FINAL, "audio": FINAL_NO_AUDIO})
    write_eval(run / "eval" / "step-000010", {"none": [1, 1, 0, 0, 1, 0, 0, 0]})
    gain, _ = gain_summary(run / "eval" / "start", run / "eval" / "final")
    (run / "summary.json").write_text(json.dumps({"steps": 20, "total_steps": 20, "finished": True, "eval_gain": gain}))
    write_samples(run, train_json, range(1, 6))
    return run


def text_of(page: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def test_page_shows_the_tables_the_comparison_and_the_chosen_steps(run_dir) -> None:
    page = render_report(run_dir, sample_steps=3)
    text = text_of(page)
    final = json.loads((run_dir / "eval" / "final" / "summary.json").read_text())["conditions"]
    lo, hi = final["none"]["ci95"]
    assert f"none: as given 0.750 [{lo:.3f}, {hi:.3f}] –" in text
    assert "audio: audio → silence 0.375" in text and "-0.375" in text
    assert "During training (eval/step-N" in text and re.search(r"\b10 0\.375 \[", text)
    # the paired comparison: 4 wins (v1, v2, v3, v5), no loss, 2 right and 2 wrong in both
    assert "accuracy 0.250 0.750 +0.500" in text
    assert "4 right only after training, 0 right only before, 2 right in both, 2 wrong in both" in text
    # 5 sampled steps, 3 shown (first, middle, last), 2 cards each
    assert "Steps 1, 3, 5 of the 5 sampled steps" in text
    assert re.findall(r'<h3>Step (\d+)</h3>', page) == ["1", "3", "5"]
    assert len(re.findall(r'class="sample" id="sample-', page)) == 6
    assert "&lt;think&gt;step 5&lt;/think&gt;" in page  # completions escaped, shown as written
    assert len(re.findall(r'<img class="chart"', page)) == 5  # every figure of watch/plot.py


def test_page_renders_in_chromium_with_every_picture_and_sound(run_dir, train_json, tmp_path) -> None:
    page = build_report(run_dir, tmp_path / "report.html", sample_steps=0)
    seen = open_page(page, tmp_path / "browser")
    assert seen["title"] == f"EchoInk run {run_dir.name}"
    assert seen["headings"][:3] == [f"EchoInk run {run_dir.name}", "Training curves", "Evaluation"]
    samples = read_samples(run_dir)
    assert len(seen["images"]) == 5 + len(samples)  # the charts and one picture per sample
    assert all(image["loaded"] for image in seen["images"]), seen["images"]
    assert {(i["width"], i["height"]) for i in seen["images"] if i["alt"] == "the question's picture"} == {(112, 112)}
    assert len(seen["audio"]) == len(samples)
    seconds = len(load_audio(load_records(train_json)[0].audio_path)) / 16_000
    for audio in seen["audio"]:
        assert audio["src"].startswith("data:audio/wav;base64,") and audio["error"] is None, audio
        assert audio["src_length"] > 16_000  # the clip itself, not an empty data URI
        assert audio["duration"] == pytest.approx(seconds, abs=0.01)  # the browser decoded the clip


def test_choose_steps_spreads_over_the_run() -> None:
    steps = [1, 25, 50, 75, 100, 125, 150]
    assert choose_steps(steps, 4) == [1, 50, 100, 150]
    assert choose_steps(steps, 0) == steps and choose_steps(steps, 10) == steps
    assert choose_steps(steps, 1) == [150]


def test_missing_parts_are_stated_not_fatal(tmp_path, run_dir) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/total": 1.0}) + "\n")
    text = text_of(render_report(tmp_path))
    assert f"No evaluation in {tmp_path / 'eval'} yet" in text
    assert "No paired comparison (no summary.json yet)" in text
    assert f"No samples in {tmp_path / 'samples.jsonl'}" in text
    assert "no placement.json in the run folder" in text
    # a sample whose clip was deleted from the run folder: the card says so
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("metrics.jsonl", "samples.jsonl"):
        (run / name).write_text((run_dir / name).read_text())
    first = read_samples(run_dir)[0]
    (run / "samples").mkdir()
    (run / first["image"]).write_bytes((run_dir / first["image"]).read_bytes())
    text = text_of(render_report(run, sample_steps=0))
    assert f"audio: {first['audio']} is missing from the run folder" in text


def test_a_folder_without_metrics_is_named(tmp_path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path}: no metrics.jsonl")):
        build_report(tmp_path)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert f"echoink: error: {tmp_path / 'nowhere'}: no such run folder" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        build_report(tmp_path)
