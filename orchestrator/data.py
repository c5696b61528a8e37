"""A run's records: the splits it trains and evaluates on, and the list of records it skipped."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avqa import LoadReport, Record, load_records
from orchestrator.config import DataConfig


class BadRecords:
    """The run's ``bad_records.jsonl``: every record skipped (at load or in rollout), with why."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    def __len__(self) -> int:
        return len(self.entries)


def load_split(path: Path, split: str, data: DataConfig, bad: BadRecords, say: Callable[[str], None]) -> list[Record]:
    """The records of one split. A broken record stops the run, naming its file, index and field,
    unless ``data.skip_bad_records``: then it is listed in ``bad`` and counted on the console."""
    if not data.skip_bad_records:
        records = load_records(path, media_root=data.media_root)
    else:
        report = LoadReport()
        records = load_records(path, media_root=data.media_root, report=report)
        for err in report.errors:
            bad.add({"split": split, "stage": "load", **err.to_dict(), "error": str(err)})
        if report.skipped:
            say(f"{split}: skipped {report.skipped} of {report.total} records (see bad_records.jsonl)")
    if not records:
        raise ValueError(f"{path}: no usable records in the {split} split")
    return records


@dataclass
class RunData:
    """The splits a run trains and evaluates on, and the records it skipped."""

    train: list[Record]
    valid: list[Record]
    bad: BadRecords


def load_run_data(data: DataConfig, run_dir: Path, say: Callable[[str], None]) -> RunData:
    """Both splits of ``data`` (no validation split when ``data.valid`` is null); skipped records
    go to the run folder's ``bad_records.jsonl``."""
    bad = BadRecords(run_dir / "bad_records.jsonl")
    train = load_split(data.train, "train", data, bad, say)
    valid = load_split(data.valid, "valid", data, bad, say) if data.valid else []
    return RunData(train=train, valid=valid, bad=bad)
