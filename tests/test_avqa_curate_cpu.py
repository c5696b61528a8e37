"""Curating AVQA-R1-6K from an OmniInstruct-shaped dataset built on disk."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import soundfile as sf
from PIL import Image

from avqa import load_audio, load_records
from avqa.curate import omniinstruct_features
from echoink.cli import main


def _wav_bytes(seconds: float, rate: int) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    sf.write(buf, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, format="WAV")
    return buf.getvalue()


def _jpg_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, format="JPEG")
    return buf.getvalue()


def build_omniinstruct(folder: Path) -> None:
    rows = [
        # id, source, question, options, answer, audio, image
        (10, "AVQA", "What makes the sound?", ["dog", "cat", "car", "bird"], "car", _wav_bytes(1, 44100), _jpg_bytes((9, 9, 9))),
        (11, "MUSIC-AVQA", "Is it loud?", ["yes", "no"], "yes", _wav_bytes(1, 16000), _jpg_bytes((9, 9, 9))),
        (12, "AVQA", "Where is this?", ["street", "beach", "room", "forest"], "desert", _wav_bytes(1, 16000), _jpg_bytes((9, 9, 9))),
        (13, "AVQA", "Which animal?", ["horse", "cow", "sheep", "goat"], "goat", b"not audio", _jpg_bytes((9, 9, 9))),
        (14, "AVQA", "What is playing?", ["piano", "guitar", "drums", "violin"], "piano", _wav_bytes(2, 22050), _jpg_bytes((200, 0, 0))),
    ]
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "source": [r[1] for r in rows],
            "question": [r[2] for r in rows],
            "options": [r[3] for r in rows],
            "answer": [r[4] for r in rows],
            "audio": [{"bytes": r[5], "path": None} for r in rows],
            "image": [{"bytes": r[6], "path": None} for r in rows],
        }
    )
    features = omniinstruct_features()
    ds = datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))
    (folder / "data").mkdir(parents=True)
    ds.to_parquet(str(folder / "data" / "valid-00000-of-00001.parquet"))


def test_curate_keeps_avqa_rows_and_reports_skips(tmp_path: Path, capsys) -> None:
    src = tmp_path / "omni"
    build_omniinstruct(src)
    out = tmp_path / "avqa"
    assert main(["data", "avqa", "--source", str(src), "--split", "valid", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kept 2 AVQA rows, ignored 1 rows of other sources, skipped 2" in printed
    json_path = out / "valid" / "omni_rl_format_valid.json"
    raw = json.loads(json_path.read_text())
    assert [r["problem_id"] for r in raw] == [10, 14]
    assert raw[0]["options"] == ["A. dog", "B. cat", "C. car", "D. bird"]
    assert raw[0]["solution"] == "<answer>C</answer>" and raw[1]["solution"] == "<answer>A</answer>"
    records = load_records(json_path)
    assert [r.answer for r in records] == ["C", "A"]
    assert load_audio(records[1].audio_path).size == 32000  # 2 s at 22.05 kHz → 16 kHz
    skipped = [json.loads(line) for line in (out / "valid" / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], "answer" in s["reason"], "audio" in s["reason"]) for s in skipped] == [
        (12, True, False),
        (13, False, True),
    ]


def test_counts_are_checked_against_the_released_split() -> None:
    from avqa.curate import RELEASED_COUNTS, CurateReport

    assert RELEASED_COUNTS == {"train": 4490, "valid": 1911}
    assert CurateReport(kept=4490).count_check("train") == "train: kept 4490, as released"
    skipped = [{"row": i, "id": i, "reason": "field 'answer': 'x' is not among the options"} for i in range(9)]
    skipped.append({"row": 9, "id": 9, "reason": "field 'audio': cannot decode (bad)"})
    report = CurateReport(kept=1901, other_source=7, skipped=skipped)
    assert report.skip_reasons() == {"answer": 9, "audio": 1}
    check = report.count_check("valid")
    assert "kept 1901, the released split has 1911 (-10)" in check and "9 answer" in check and "1 audio" in check
    assert report.to_dict("valid")["released"] == 1911


def test_synthetic_source_curates_like_omniinstruct(tmp_path: Path) -> None:
    from avqa.curate import curate, write_synthetic_source

    source = write_synthetic_source(tmp_path / "src", train=3, valid=2, seed=1)
    for split, kept in (("train", 3), ("valid", 2)):
        json_path, report = curate(str(source), split, tmp_path / "out", progress=False)
        assert (report.kept, report.other_source, report.skip_reasons()) == (kept, 1, {"answer": 1})
        assert len(load_records(json_path)) == kept
