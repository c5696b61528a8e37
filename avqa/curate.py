"""Curate AVQA-R1-6K from OmniInstruct-v1: keep the AVQA rows, write media files and the released JSON."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image
from tqdm import tqdm

from avqa.record import LETTERS

KEEP_SOURCE = "AVQA"


@dataclass
class CurateReport:
    kept: int = 0
    other_source: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"kept {self.kept} AVQA rows, ignored {self.other_source} rows of other sources, skipped {len(self.skipped)}"]
        lines += [f"  - row {s['row']} (id {s['id']!r}): {s['reason']}" for s in self.skipped[:20]]
        if len(self.skipped) > 20:
            lines.append(f"  … and {len(self.skipped) - 20} more (see skipped.jsonl)")
        return "\n".join(lines)


def open_source(source: str, split: str) -> Any:
    """OmniInstruct-v1 as a `datasets.Dataset`: a saved folder, parquet files, or a hub id."""
    import datasets

    path = Path(source)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source}: has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        ds = loaded
    elif path.is_dir():
        files = sorted(str(p) for p in path.rglob(f"{split}-*.parquet"))
        if not files:
            raise ValueError(f"{source}: no '{split}-*.parquet' files in this folder")
        ds = datasets.load_dataset("parquet", data_files={split: files}, split=split)
    elif path.suffix == ".parquet":
        ds = datasets.load_dataset("parquet", data_files={split: [str(path)]}, split=split)
    elif path.exists():
        raise ValueError(f"{source}: expected a folder or .parquet file")
    else:
        ds = datasets.load_dataset(source, split=split)
    # decode media ourselves: `datasets` needs torchcodec for audio, which this install leaves out
    for column, feature in (("audio", datasets.Audio(decode=False)), ("image", datasets.Image(decode=False))):
        if column in ds.features and isinstance(ds.features[column], type(feature)):
            ds = ds.cast_column(column, feature)
    return ds


def curate(source: str, split: str, out_dir: str | Path, *, progress: bool = True) -> tuple[Path, CurateReport]:
    ds = open_source(source, split)
    split_dir = Path(out_dir) / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "audios").mkdir(parents=True, exist_ok=True)
    report = CurateReport()
    records = []
    for row_index, row in enumerate(tqdm(ds, desc=f"curate {split}", unit="row", disable=not progress)):
        if row.get("source") != KEEP_SOURCE:
            report.other_source += 1
            continue
        rid = row.get("id", row_index)
        try:
            record = _convert(row, rid, split_dir)
        except ValueError as exc:
            report.skipped.append({"row": row_index, "id": rid, "reason": str(exc)})
            continue
        records.append(record)
        report.kept += 1
    json_path = split_dir / f"omni_rl_format_{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    with open(split_dir / "skipped.jsonl", "w", encoding="utf-8") as fh:
        for item in report.skipped:
            fh.write(json.dumps(item, default=str) + "\n")
    return json_path, report


def _convert(row: dict[str, Any], rid: Any, split_dir: Path) -> dict[str, Any]:
    options = row.get("options")
    answer = row.get("answer")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("field 'question': missing or empty")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise ValueError(f"field 'options': expected a list of at least 2 strings, got {options!r}")
    if len(options) > len(LETTERS):
        raise ValueError(f"field 'options': {len(options)} options, at most {len(LETTERS)}")
    stripped = [o.strip() for o in options]
    if not isinstance(answer, str) or answer.strip() not in stripped:
        raise ValueError(f"field 'answer': {answer!r} is not among the options {stripped}")
    gold = LETTERS[stripped.index(answer.strip())]
    name = f"{rid}"
    image_rel, audio_rel = f"images/{name}.jpg", f"audios/{name}.wav"
    _write_image(row.get("image"), split_dir / image_rel)
    _write_audio(row.get("audio"), split_dir / audio_rel)
    return {
        "problem_id": rid,
        "problem": question.strip(),
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": [f"{LETTERS[i]}. {o}" for i, o in enumerate(stripped)],
        "solution": f"<answer>{gold}</answer>",
        "path": {"image": image_rel, "audio": audio_rel},
        "data_source": KEEP_SOURCE,
    }


def _write_image(value: Any, dest: Path) -> None:
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes"):
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = Image.open(value["path"])
        else:
            raise ValueError("no image data")
        img.load()
        img.convert("RGB").save(dest, quality=95)
    except (OSError, ValueError) as exc:
        raise ValueError(f"field 'image': cannot decode ({exc})") from None


def _write_audio(value: Any, dest: Path) -> None:
    try:
        if isinstance(value, dict) and value.get("array") is not None:
            samples, rate = np.asarray(value["array"], dtype=np.float32), int(value["sampling_rate"])
        elif isinstance(value, dict) and value.get("bytes"):
            samples, rate = sf.read(io.BytesIO(value["bytes"]), dtype="float32")
        elif isinstance(value, dict) and value.get("path"):
            samples, rate = sf.read(value["path"], dtype="float32")
        elif hasattr(value, "get_all_samples"):  # a torchcodec decoder, where torchcodec is installed
            decoded = value.get_all_samples()
            samples, rate = decoded.data.numpy().T, int(decoded.sample_rate)
        else:
            raise ValueError("no audio data")
    except (RuntimeError, sf.LibsndfileError, TypeError, KeyError) as exc:
        raise ValueError(f"field 'audio': cannot decode ({exc})") from None
    if samples.size == 0 or not np.all(np.isfinite(samples)):
        raise ValueError("field 'audio': empty or non-finite samples")
    sf.write(dest, samples, rate, subtype="PCM_16")
