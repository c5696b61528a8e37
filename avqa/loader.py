"""Loaders for the released layout: a JSON array, JSON lines, or a folder saved by `datasets`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avqa.errors import RecordError
from avqa.record import Record, validate_record


@dataclass
class LoadReport:
    """Collects the records a loader refused, so a run can skip them and say how many."""

    errors: list[RecordError] = field(default_factory=list)
    total: int = 0

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def summary(self) -> str:
        if not self.errors:
            return f"{self.total} records, none skipped"
        lines = [f"{self.total} records, {self.skipped} skipped:"]
        lines += [f"  - {err}" for err in self.errors[:20]]
        if self.skipped > 20:
            lines.append(f"  … and {self.skipped - 20} more")
        return "\n".join(lines)


def load_records(
    path: str | Path,
    *,
    media_root: str | Path | None = None,
    check_media: bool = True,
    report: LoadReport | None = None,
) -> list[Record]:
    """Read and validate every record of a dataset file or folder.

    Media paths are relative to ``media_root``, by default the folder that holds the JSON file
    (or the folder saved by ``datasets``). Without ``report`` the first bad record raises
    :class:`RecordError`; with one, bad records are collected there and the good ones returned.
    """
    path = Path(path)
    objects, root = _read_objects(path)
    root = Path(media_root) if media_root is not None else root
    records: list[Record] = []
    seen: dict[str, int] = {}
    if report is not None:
        report.total += len(objects)
    for index, obj in enumerate(objects):
        try:
            record = validate_record(obj, file=path, index=index, root=root, check_media=check_media)
            if record.id in seen:
                raise RecordError(
                    path, index, record.problem_id, "problem_id",
                    f"duplicate id: record {seen[record.id]} has the same problem_id",
                )
        except RecordError as err:
            if report is None:
                raise
            report.errors.append(err)
            continue
        seen[record.id] = index
        records.append(record)
    return records


def _read_objects(path: Path) -> tuple[list[Any], Path]:
    if not path.exists():
        raise RecordError(path, None, None, "<file>", "no such file or folder")
    if path.is_dir():
        return _read_saved_dataset(path), path
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(path, None, None, "<file>", f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RecordError(path, None, None, "<file>", f"cannot read: {exc.strerror}") from None
    if not text.strip():
        raise RecordError(path, None, None, "<file>", "the file is empty")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[") and path.suffix != ".json"):
        return _parse_jsonl(path, text), path.parent
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            path, None, None, "<file>", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise RecordError(path, None, None, "<file>", f"expected a JSON array of records, got {type(data).__name__}")
    return data, path.parent


def _parse_jsonl(path: Path, text: str) -> list[Any]:
    objects = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RecordError(
                path, len(objects), None, "<line>", f"invalid JSON on line {lineno}: {exc.msg}"
            ) from None
    return objects


def _read_saved_dataset(path: Path) -> list[Any]:
    """A folder written by ``Dataset.save_to_disk`` (one split) or ``DatasetDict`` with a single split."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise RecordError(path, None, None, "<folder>", f"not a folder saved by `datasets`: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise RecordError(
                path, None, None, "<folder>",
                f"holds splits {sorted(loaded)}: point at one split's folder instead",
            )
        loaded = next(iter(loaded.values()))
    return [dict(row) for row in loaded]
