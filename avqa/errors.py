"""Errors of the task package: each names the file, and for records the index, id and field."""

from __future__ import annotations

from pathlib import Path


class RecordError(ValueError):
    """A dataset record that cannot be used as written."""

    def __init__(
        self,
        file: str | Path,
        index: int | None,
        record_id: object,
        field: str,
        reason: str,
    ) -> None:
        self.file = str(file)
        self.index = index
        self.record_id = record_id
        self.field = field
        self.reason = reason
        where = f"{self.file}"
        if index is not None:
            where += f": record {index}"
            if record_id is not None:
                where += f" (id {record_id!r})"
        super().__init__(f"{where}: field '{field}': {reason}")

    def to_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "index": self.index,
            "id": self.record_id,
            "field": self.field,
            "reason": self.reason,
        }


class MediaError(ValueError):
    """An audio or image file that cannot be read or holds no usable signal."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
