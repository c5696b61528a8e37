"""What the model said, to read and hear: at step 1 and every ``log.samples_every`` steps a few of
the step's completions, with their question, picture, sound, rewards and advantage, go to
TensorBoard (text, image and audio summaries) and to ``RUN/samples.jsonl``; the picture (a
thumbnail of what the model saw) and the clip (what it heard) are copied into ``RUN/samples/``, so
the run folder alone holds everything `echoink report` shows, even after the dataset moved.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avqa import MediaError, Record, load_audio, load_image
from omni.inputs import MediaSettings
from watch.jsonl import numbered_jsonl

SAMPLES_FILE = "samples.jsonl"
MEDIA_DIR = "samples"
THUMBNAIL_SIDE = 256  # px: enough to see what the picture shows, small enough to inline in a page
# every row of samples.jsonl holds these (the report reads them; `read_samples` checks them)
FIELDS = ("step", "slot", "id", "question", "options", "answer", "completion", "rewards", "reward",
          "advantage", "image", "audio")


@dataclass(frozen=True)
class ScoredCompletion:
    """One completion as it was scored (by `orchestrator.scoring`), for people to read."""

    record: Record
    text: str
    tokens: int
    finish_reason: str
    rewards: dict[str, float]  # each reward component before weighting
    reward: float  # the weighted total the advantage was computed from (overlong penalty included)
    advantage: float


def is_due(step: int, every: int) -> bool:
    """Step 1 (what the policy says before it learnt anything, and a run that dies early still
    shows some) and every ``every`` steps; never with ``every`` 0."""
    return every > 0 and (step == 1 or step % every == 0)


def pick(completions: Sequence[ScoredCompletion], count: int) -> list[tuple[int, ScoredCompletion]]:
    """``count`` completions as (index within its question's group, completion).

    Round robin over the step's questions in rollout order: completion 0 of each question, then
    completion 1 of each, and so on. The questions' order comes from the seeded sampler and a
    question's completion 0 is an ordinary draw of the policy, so the samples show what the policy
    typically says (not its best or worst, which the rewards already summarise), are the same when
    the run is repeated, and cover as many questions as ``count`` allows.
    """
    groups: dict[str, list[ScoredCompletion]] = {}
    for completion in completions:
        groups.setdefault(completion.record.id, []).append(completion)
    picked: list[tuple[int, ScoredCompletion]] = []
    depth = 0
    while len(picked) < count and any(depth < len(g) for g in groups.values()):
        for group in groups.values():
            if depth < len(group) and len(picked) < count:
                picked.append((depth, group[depth]))
        depth += 1
    return picked


def media_name(record_id: str) -> str:
    """A file name for a question's media: readable, and unique for any id (ids may hold '/')."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", record_id).strip("._")[:40] or "question"
    return f"{slug}-{hashlib.sha1(record_id.encode('utf-8')).hexdigest()[:8]}"


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM mono WAV: what every browser's <audio> plays."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


class SampleLog:
    """Writes the samples of the steps that are due (`is_due`); ``writer`` is the run's
    TensorBoard SummaryWriter (None: samples.jsonl and the media only)."""

    def __init__(
        self, run_dir: Path, *, every: int, count: int, media: MediaSettings, writer: Any | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.every = every
        self.count = count
        self.media = media
        self.writer = writer

    def log(self, step: int, completions: Sequence[ScoredCompletion]) -> list[dict[str, Any]]:
        """The rows written for ``step`` (none when the step is not due)."""
        if not is_due(step, self.every) or not completions:
            return []
        totals: dict[str, list[float]] = {}
        for completion in completions:
            totals.setdefault(completion.record.id, []).append(completion.reward)
        rows = []
        for slot, (index, completion) in enumerate(pick(completions, self.count)):
            image, clip, files = self._media(completion)
            record = completion.record
            row = {
                "step": step,
                "slot": slot,
                "id": record.id,
                "data_type": record.data_type,
                "question": record.question,
                "options": list(record.options),
                "answer": record.answer,
                "completion_index": index,
                "completion": completion.text,
                "tokens": completion.tokens,
                "finish_reason": completion.finish_reason,
                "rewards": completion.rewards,
                "reward": completion.reward,
                "advantage": completion.advantage,
                "group_rewards": totals[record.id],
                **files,
            }
            rows.append(row)
            if self.writer is not None:
                self._to_tensorboard(step, slot, row, image, clip)
        with open(self.run_dir / SAMPLES_FILE, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            self.writer.flush()
        return rows

    def _media(self, completion: ScoredCompletion) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:
        """The thumbnail (HWC uint8) and clip of the completion's question, copied into samples/
        once per question; paths in the row are relative to the run folder. A medium that cannot
        be read is named in ``media_errors`` rather than ending the run: the rollout read it a
        moment ago, so this is a file that changed under the run, not a bug to stop for."""
        record, m = completion.record, self.media
        folder = self.run_dir / MEDIA_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = media_name(record.id)
        row: dict[str, Any] = {"image": None, "audio": None, "video": None, "media_errors": {}}
        image = clip = None
        if record.image_path is not None:
            try:
                picture = load_image(record.image_path, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
                picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))  # never enlarges: small pictures stay as seen
                target = folder / f"{name}.jpg"
                if not target.is_file():
                    picture.save(target, "JPEG", quality=90)
                image = np.asarray(picture, dtype=np.uint8)
                row["image"] = f"{MEDIA_DIR}/{target.name}"
            except (MediaError, OSError) as exc:
                row["media_errors"]["image"] = str(exc)
        if record.audio_path is not None:
            try:
                clip = load_audio(record.audio_path, sample_rate=m.sample_rate, max_seconds=m.max_audio_seconds)
                target = folder / f"{name}.wav"
                if not target.is_file():
                    target.write_bytes(wav_bytes(clip, m.sample_rate))
                row["audio"] = f"{MEDIA_DIR}/{target.name}"
            except (MediaError, OSError) as exc:
                row["media_errors"]["audio"] = str(exc)
        video = record.video_path
        if video is not None:
            row["video"] = str(video)  # named, not copied: a video is too large to keep per sample
        return image, clip, row

    def _to_tensorboard(
        self, step: int, slot: int, row: dict[str, Any], image: np.ndarray | None, clip: np.ndarray | None
    ) -> None:
        # one tag per slot: TensorBoard's step slider then walks one slot through the run
        tag = f"samples/{slot}"
        self.writer.add_text(tag, sample_markdown(row), step)
        if image is not None:
            self.writer.add_image(f"{tag}/image", image, step, dataformats="HWC")
        if clip is not None:
            self.writer.add_audio(f"{tag}/audio", clip[None, :], step, sample_rate=self.media.sample_rate)


def sample_markdown(row: dict[str, Any]) -> str:
    """A sample as TensorBoard's text plugin shows it (Markdown; the completion as a code block so
    its <think>/<answer> tags are shown, not swallowed as HTML)."""
    parts = ", ".join(f"{k} {v:g}" for k, v in row["rewards"].items())
    lines = [
        f"**step {row['step']}**, question `{row['id']}`, completion {row.get('completion_index', 0)}: "
        f"gold **{row['answer']}**, reward {row['reward']:g} ({parts}), advantage {row['advantage']:+.3f}",
        "",
        row["question"],
        "",
        *[f"- {option}" for option in row["options"]],
        "",
        *["    " + line for line in row["completion"].splitlines() or [""]],
    ]
    return "\n".join(lines)


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``RUN/samples.jsonl`` ([] when the file is missing); a line that is not JSON or
    lacks a field is an error naming the file, the line and the field."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = []
    for number, row in numbered_jsonl(path):
        missing = [name for name in FIELDS if name not in row]
        if missing:
            raise ValueError(f"{path}: line {number} has no field {missing[0]!r}")
        rows.append(row)
    return rows
