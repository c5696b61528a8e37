"""The AVQA-R1-6K record: the released JSON schema and the resolved record the system passes around."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, field_validator

from avqa.errors import RecordError

OPTION_RE = re.compile(r"^([A-Z])\.\s*(.*)$", re.S)
SOLUTION_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


# data_type → the files its `path` object names. video_audio reads the sound track of its own video
# (Qwen2.5-Omni's use_audio_in_video), so it names one file; text names none.
MEDIA_FILES: dict[str, tuple[str, ...]] = {
    "image_audio": ("image", "audio"),
    "video_audio": ("video",),
    "video": ("video",),
    "audio": ("audio",),
    "image": ("image",),
    "text": (),
}
DATA_TYPES = tuple(MEDIA_FILES)
# data_type → what the model reads: the media a prompt carries (and an ablation can take away);
# video_audio also hears its video's own sound track
MODALITIES: dict[str, tuple[str, ...]] = {**MEDIA_FILES, "video_audio": ("video", "audio")}


class RawRecord(BaseModel):
    """One object of the released JSON array, field for field."""

    model_config = ConfigDict(extra="allow")
    problem_id: Any
    problem: StrictStr
    data_type: Literal["image_audio", "video_audio", "video", "audio", "image", "text"]
    problem_type: Literal["multiple choice"]
    options: list[StrictStr]
    solution: StrictStr
    path: dict[str, StrictStr] | None = None  # checked against data_type in validate_record
    data_source: StrictStr

    @field_validator("problem_id", mode="before")
    @classmethod
    def _id_is_int_or_str(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be an integer or a string, got {type(value).__name__}")
        return value


@dataclass(frozen=True)
class Record:
    """A validated question with its media resolved to absolute paths."""

    id: str
    question: str
    options: tuple[str, ...]
    answer: str  # the gold letter(s), e.g. "C" or "A,C"
    image_path: Path | None = None
    audio_path: Path | None = None
    data_source: str = ""
    problem_id: int | str = ""
    source_file: str = ""
    index: int = -1
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    video_path: Path | None = None
    data_type: str = "image_audio"

    def __post_init__(self) -> None:
        # a Record built in code obeys the same media rule as one read from a file
        if self.data_type not in MEDIA_FILES:
            raise ValueError(f"record {self.id!r}: unknown data_type {self.data_type!r}; one of {', '.join(DATA_TYPES)}")
        held = {name for name in ("image", "audio", "video") if self.media_path(name) is not None}
        wanted = set(MEDIA_FILES[self.data_type])
        if held != wanted:
            raise ValueError(f"record {self.id!r}: data_type {self.data_type!r} {media_mismatch(wanted, held)}")

    def media_path(self, name: str) -> Path | None:
        """The file of medium ``name`` ("image", "audio" or "video"), None where the type has none."""
        return {"image": self.image_path, "audio": self.audio_path, "video": self.video_path}[name]

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the model reads for this record, e.g. ("video", "audio") for video_audio."""
        return MODALITIES[self.data_type]

    @property
    def letters(self) -> tuple[str, ...]:
        return tuple(LETTERS[: len(self.options)])

    @property
    def gold_letters(self) -> frozenset[str]:
        return parse_answer_letters(self.answer)

    @property
    def solution(self) -> str:
        return f"<answer>{self.answer}</answer>"

    def to_json(self, root: Path) -> dict[str, Any]:
        """The released layout's object, media paths relative to ``root``."""
        out: dict[str, Any] = {
            "problem_id": self.problem_id,
            "problem": self.question,
            "data_type": self.data_type,
            "problem_type": "multiple choice",
            "options": list(self.options),
            "solution": self.solution,
        }
        if MEDIA_FILES[self.data_type]:
            out["path"] = {
                name: self.media_path(name).relative_to(root).as_posix()  # type: ignore[union-attr]
                for name in MEDIA_FILES[self.data_type]
            }
        out["data_source"] = self.data_source
        return out


def media_mismatch(wanted: set[str], held: set[str]) -> str:
    """The reason a record's media do not fit its data_type: the missing and the extra medium."""
    parts = []
    if wanted - held:
        parts.append("needs " + " and ".join(f"'{m}'" for m in sorted(wanted - held)))
    if held - wanted:
        parts.append("takes no " + " or ".join(f"'{m}'" for m in sorted(held - wanted)))
    needs = ", ".join(sorted(wanted)) or "no media"
    return "; ".join(parts) + f" (it reads: {needs})"


def parse_answer_letters(text: str) -> frozenset[str]:
    """Gold or predicted letters: "C", "A,C", "AC", "A, C" all read as sets of capital letters."""
    cleaned = text.replace(",", " ").replace(";", " ").split()
    letters: set[str] = set()
    for chunk in cleaned:
        if not chunk.isalpha() or not chunk.isupper():
            return frozenset()
        letters.update(chunk)
    return frozenset(letters)


def _field_of(error: ValidationError) -> tuple[str, str]:
    first = error.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<record>"
    return loc, first["msg"]


def validate_record(
    obj: object,
    *,
    file: Path,
    index: int,
    root: Path,
    check_media: bool = True,
) -> Record:
    """Check one JSON object against the released schema and resolve its media paths.

    ``root`` is the dataset folder: media paths are relative to it and may not leave it,
    also not through symbolic links.
    """
    rid = obj.get("problem_id") if isinstance(obj, dict) else None
    if not isinstance(obj, dict):
        raise RecordError(file, index, None, "<record>", f"expected a JSON object, got {type(obj).__name__}")
    try:
        raw = RawRecord.model_validate(obj)
    except ValidationError as exc:
        loc, msg = _field_of(exc)
        raise RecordError(file, index, rid, loc, msg) from None

    def fail(field_name: str, reason: str) -> RecordError:
        return RecordError(file, index, raw.problem_id, field_name, reason)

    if isinstance(raw.problem_id, str) and not raw.problem_id.strip():
        raise fail("problem_id", "must not be empty")
    if not raw.problem.strip():
        raise fail("problem", "must not be empty")
    if len(raw.options) < 2:
        raise fail("options", f"needs at least 2 options, got {len(raw.options)}")
    for pos, option in enumerate(raw.options):
        match = OPTION_RE.match(option)
        expected = LETTERS[pos] if pos < len(LETTERS) else "?"
        if match is None or match.group(1) != expected:
            raise fail(f"options[{pos}]", f"expected an option lettered '{expected}. …', got {option!r}")
        if not match.group(2).strip():
            raise fail(f"options[{pos}]", f"option {expected} has no text")
    sol = SOLUTION_RE.search(raw.solution)
    if sol is None:
        raise fail("solution", f"expected '<answer>X</answer>', got {raw.solution!r}")
    gold = parse_answer_letters(sol.group(1))
    if not gold:
        raise fail("solution", f"no option letter in {raw.solution!r}")
    allowed = set(LETTERS[: len(raw.options)])
    if not gold <= allowed:
        bad = ",".join(sorted(gold - allowed))
        raise fail("solution", f"gold letter {bad} is not among the options {'/'.join(sorted(allowed))}")

    paths = raw.path or {}
    wanted = set(MEDIA_FILES[raw.data_type])
    if set(paths) != wanted:
        odd = sorted(wanted - set(paths)) or sorted(set(paths) - wanted)  # the missing medium first
        field_name = f"path.{odd[0]}"
        raise fail(field_name, f"data_type {raw.data_type!r} {media_mismatch(wanted, set(paths))}")
    resolved = {
        name: resolve_media(rel, root=root, check_exists=check_media, fail=fail, field_name=f"path.{name}")
        for name, rel in paths.items()
    }
    extra = dict(raw.model_extra or {})
    return Record(
        id=str(raw.problem_id),
        question=raw.problem,
        options=tuple(raw.options),
        answer=sol.group(1).strip(),
        image_path=resolved.get("image"),
        audio_path=resolved.get("audio"),
        video_path=resolved.get("video"),
        data_type=raw.data_type,
        data_source=raw.data_source,
        problem_id=raw.problem_id,
        source_file=str(file),
        index=index,
        extra=extra,
    )


def resolve_media(
    rel: str,
    *,
    root: Path,
    check_exists: bool,
    fail: Any,
    field_name: str,
) -> Path:
    """Resolve a media path inside ``root``; refuse absolute paths, '..' escapes and symlink escapes."""
    if not rel.strip():
        raise fail(field_name, "empty path")
    if "\x00" in rel:
        raise fail(field_name, "path holds a NUL byte")
    candidate = Path(rel)
    if candidate.is_absolute():
        raise fail(field_name, f"absolute path {rel!r}: media paths are relative to {root}")
    root_real = root.resolve()
    joined = root_real / candidate
    real = joined.resolve()
    if not real.is_relative_to(root_real):
        raise fail(field_name, f"path {rel!r} leads outside the dataset folder {root_real}")
    if check_exists and not real.is_file():
        what = "does not exist" if not joined.exists() and not joined.is_symlink() else "is not a file"
        raise fail(field_name, f"media file {joined} {what}")
    return real
