"""`echoink reproduce --rehearse`: the whole chain (curate, base evals, train, trained evals, report)
on a tiny random checkpoint and a synthetic OmniInstruct-like source, stopped after one training step
and continued by a second call."""

from __future__ import annotations

import json
import re
from pathlib import Path

from avqa import load_records
from echoink.cli import main
from evaluation.protocols import BY_NAME
from omni.inputs import encode_prompt, load_processor, prepare_prompt
from watch.jsonl import read_metrics


def test_rehearsal_writes_a_full_report_and_resumes(ray_local, tmp_path: Path, capsys) -> None:
    out = tmp_path / "reproduction"
    assert main(["reproduce", "--rehearse", "--out", str(out), "--stop-after-steps", "1"]) == 0
    first = capsys.readouterr().out
    assert "training stopped before its end" in first and not (out / "report.md").exists()
    assert json.loads((out / "reproduce.json").read_text())["stopped"] is True
    for split, kept in (("train", 8), ("valid", 6)):
        counts = json.loads((out / "data" / split / "curate.json").read_text())
        # the synthetic source holds one row of another source and one broken row per split
        assert (counts["kept"], counts["other_source"], counts["skipped_by_field"]) == (kept, 1, {"answer": 1})
        assert "the released split has" in counts["check"]

    assert main(["reproduce", "--rehearse", "--out", str(out)]) == 0
    second = capsys.readouterr().out
    # the second call continued: nothing curated or evaluated twice, training resumed at step 1
    assert "curating" not in second and "base-paper: done before" in second and "base-fair: done before" in second
    assert "resumed from" in second and "step-000001" in second
    assert [row["step"] for row in read_metrics(out / "train" / "metrics.jsonl")] == [1, 2]

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| |")]
    assert len(table) == 5, report
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), line
        assert not re.search(r"\b(None|nan)\b", line), line
    assert "80.53" in report and "85.77" in report and "McNemar p" in report
    assert report.count("[") >= 4  # an interval beside each of our four accuracies

    # each folder says which protocol scored it, and the protocols' prompts reached vLLM
    processor = load_processor(out / "rehearsal" / "tiny-omni")
    records = load_records(out / "data" / "valid" / "omni_rl_format_valid.json")
    for folder, protocol in (("base-paper", "paper-base"), ("base-fair", "fair"), ("trained-paper", "paper-trained")):
        summary = json.loads((out / "eval" / folder / "summary.json").read_text())
        assert summary["protocol"]["name"] == protocol and summary["questions"] == 6
        rows = {r["id"]: r for r in map(json.loads, (out / "eval" / folder / "results.jsonl").read_text().splitlines())}
        for record in BY_NAME[protocol].prepare(records[:2]):
            expected = encode_prompt(processor, prepare_prompt(record, processor)).input_ids.numel()
            assert rows[record.id]["prompt_tokens"] == expected, (folder, record.id)
    paper = json.loads((out / "eval" / "trained-paper" / "summary.json").read_text())["protocol"]["decoding"]
    assert (paper["temperature"], paper["top_p"], paper["top_k"], paper["max_new_tokens"]) == (1.0, 0.95, 50, 24)
