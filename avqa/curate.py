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
# AVQA-R1-6K as released (EchoInk-R1): the questions each split of OmniInstruct-v1 gives
RELEASED_COUNTS: dict[str, int] = {"train": 4490, "valid": 1911}


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

    def skip_reasons(self) -> dict[str, int]:
        """Skipped rows counted by the field that failed ("answer", "audio", …)."""
        counts: dict[str, int] = {}
        for item in self.skipped:
            reason = str(item.get("reason", ""))
            key = reason.split("'")[1] if reason.startswith("field '") else reason
            counts[key] = counts.get(key, 0) + 1
        return counts

    def count_check(self, split: str) -> str:
        """How the kept count compares with the released AVQA-R1-6K split (4,490 train / 1,911 valid)."""
        expected = RELEASED_COUNTS.get(split)
        if expected is None:
            return f"{split}: kept {self.kept} (no released count to compare with)"
        if self.kept == expected:
            return f"{split}: kept {self.kept}, as released"
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.skip_reasons().items())) or "none"
        return (
            f"{split}: kept {self.kept}, the released split has {expected} ({self.kept - expected:+d}); "
            f"AVQA rows seen {self.kept + len(self.skipped)}, skipped {len(self.skipped)} (by field: {reasons}), "
            f"rows of other sources {self.other_source}"
        )

    def to_dict(self, split: str) -> dict[str, Any]:
        return {
            "split": split,
            "kept": self.kept,
            "other_source": self.other_source,
            "skipped": len(self.skipped),
            "skipped_by_field": self.skip_reasons(),
            "released": RELEASED_COUNTS.get(split),
            "check": self.count_check(split),
        }


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


def omniinstruct_features() -> Any:
    """The columns of OmniInstruct-v1 that curation reads, as a `datasets` schema (synthetic sources)."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("int64"),
            "source": datasets.Value("string"),
            "question": datasets.Value("string"),
            "options": datasets.List(datasets.Value("string")),
            "answer": datasets.Value("string"),
            "audio": datasets.Audio(),
            "image": datasets.Image(),
        }
    )


def write_synthetic_source(folder: str | Path, *, train: int = 8, valid: int = 6, seed: int = 0) -> Path:
    """An OmniInstruct-v1-shaped source for rehearsals and tests: one parquet file per split with the
    columns curation reads (``id``, ``source``, ``question``, ``options``, ``answer``, ``audio`` and
    ``image`` as encoded bytes), the synthetic task's media (`avqa.synth`), and beside the AVQA rows
    one row of another source and one whose answer is not an option per split (curation skips both)."""
    import datasets
    import pyarrow as pa

    from avqa import synth

    spec = synth.DEMO_SPEC
    out = Path(folder)
    (out / "data").mkdir(parents=True, exist_ok=True)
    features = omniinstruct_features()
    for split_index, (split, count) in enumerate((("train", train), ("valid", valid))):
        rng = np.random.default_rng([seed, split_index])
        rows: list[dict[str, Any]] = []
        for i in range(count + 2):
            colour = spec.colours[rng.integers(len(spec.colours))]
            tone = spec.tones[rng.integers(len(spec.tones))]
            options = [synth.option_text(c, t) for c, t in synth.choose_options(colour, tone, spec, rng)]
            answer = synth.option_text(colour, tone)
            source = KEEP_SOURCE
            if i == count:
                source = "MUSIC-AVQA"  # another source: ignored
            elif i == count + 1:
                answer = "none of these"  # not an option: skipped
            image = io.BytesIO()
            synth.draw_image(colour, spec.image_size, rng, spec.shape_scale).save(image, format="JPEG", quality=92)
            audio = io.BytesIO()
            sf.write(audio, synth.make_tone(tone, spec, rng), spec.sample_rate, format="WAV", subtype="PCM_16")
            rows.append(
                {
                    "id": 100_000 * split_index + i,
                    "source": source,
                    "question": synth.QUESTION,
                    "options": options,
                    "answer": answer,
                    "audio": {"bytes": audio.getvalue(), "path": None},
                    "image": {"bytes": image.getvalue(), "path": None},
                }
            )
        table = pa.table({name: [row[name] for row in rows] for name in features})
        ds = datasets.Dataset(table.cast(features.arrow_schema), info=datasets.DatasetInfo(features=features))
        ds.to_parquet(str(out / "data" / f"{split}-00000-of-00001.parquet"))
    return out
