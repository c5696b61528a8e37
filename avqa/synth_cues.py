"""The synthetic set's cues and question pieces, shared by :mod:`avqa.synth` (pictures, sounds,
text, the dataset writer) and :mod:`avqa.synth_video` (the video kinds): colours, tones, shapes,
directions, the questions' wording, the spec, and how options are drawn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 165, 60),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
TONES_HZ: dict[str, float] = {"low": 300.0, "high": 1500.0, "middle": 700.0, "very high": 3000.0}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")  # the way a video's shape moves
QUESTION = (
    "The picture shows a coloured shape and the sound clip plays a tone. "
    "Which option names both the colour of the shape and the pitch of the tone?"
)
QUESTIONS: dict[str, str] = {
    "image_audio": QUESTION,
    "video_audio": (
        "The video shows a shape moving and its sound track plays a tone. "
        "Which option names both the direction the shape moves in and the pitch of the tone?"
    ),
    "video": "The video shows a shape moving. Which option names the direction it moves in?",
    "audio": "The sound clip plays a tone. Which option names the pitch of the tone?",
    "image": "The picture shows a coloured shape. Which option names the colour of the shape?",
    "text": "A label on the box says that the ball inside is {colour}. Which option names the colour of the ball?",
}
@dataclass(frozen=True)
class SynthSpec:
    image_size: int = 112
    audio_seconds: float = 2.0
    sample_rate: int = 16_000
    colours: tuple[str, ...] = ("red", "blue")
    tones: tuple[str, ...] = ("low", "high")
    num_options: int = 4
    shuffle_options: bool = False  # False: every question lists the combinations in one fixed order
    shape_scale: tuple[float, float] = (0.4, 0.7)  # the shape's side as a share of the image's
    # videos: image_size pixels square; the file's own frame rate (the loader samples at its own,
    # 2 fps by default, so 2 s give it 4 frames)
    video_seconds: float = 2.0
    video_fps: float = 8.0
    directions: tuple[str, ...] = ("left", "right")
    video_shape_scale: float = 0.35  # the moving shape's side as a share of the frame's: room to travel

    def __post_init__(self) -> None:
        unknown = [c for c in self.colours if c not in COLOURS] + [t for t in self.tones if t not in TONES_HZ]
        unknown += [d for d in self.directions if d not in DIRECTIONS]
        if unknown:
            raise ValueError(
                f"unknown colour, tone or direction: {unknown}; "
                f"known: {sorted(COLOURS)} / {sorted(TONES_HZ)} / {list(DIRECTIONS)}"
            )
        if len(self.colours) < 2 or len(self.tones) < 2 or len(self.directions) < 2:
            raise ValueError("need at least two colours, two tones and two directions so that each medium matters")
        if self.video_seconds <= 0 or self.video_fps <= 0:
            raise ValueError(f"video_seconds and video_fps must be > 0, got {self.video_seconds}, {self.video_fps}")
        if not 0 < self.video_shape_scale <= 0.6:
            raise ValueError(f"video_shape_scale must be in (0, 0.6] to leave the shape room to move, got {self.video_shape_scale}")
        if not 2 <= self.num_options <= len(self.colours) * len(self.tones):
            raise ValueError(f"num_options must be between 2 and {len(self.colours) * len(self.tones)}")
        if self.image_size < 28 or self.audio_seconds <= 0:
            raise ValueError("image_size must be ≥ 28 pixels and audio_seconds > 0")
        if not 0 < self.shape_scale[0] <= self.shape_scale[1] <= 1:
            raise ValueError(f"shape_scale must satisfy 0 < low ≤ high ≤ 1, got {self.shape_scale}")


# `make demo`'s data: small media keep a CPU step near a second; a shape filling most of the picture
# makes the colour cue as easy for a tiny random vision tower as the pitch is for its audio tower
# Videos: 56 px, 2 s at 4 fps in the file, so the loader's 2-fps sampling gives 4 frames (2 temporal
# patches, 8 vision tokens) and a shape 40 % of the frame wide travels a visible 10-30 px.
DEMO_SPEC = SynthSpec(image_size=56, audio_seconds=1.0, shape_scale=(0.8, 1.0), video_fps=4.0, video_shape_scale=0.4)


@dataclass(frozen=True)
class Question:
    """One synthetic question before it gets its id: the JSON fields that differ by kind."""

    data_type: str
    problem: str
    options: list[str]  # option texts, without their letters
    gold: int  # index of the right option
    path: dict[str, str]  # medium → file relative to the split folder; empty for text


def choose_pairs(
    first: str, second: str, firsts: Sequence[str], seconds: Sequence[str], spec: SynthSpec, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """Options as (first cue, second cue) pairs from ``firsts`` × ``seconds``; exactly one matches both."""
    combos = list(itertools.product(firsts, seconds))
    num_options = min(spec.num_options, len(combos))
    if not spec.shuffle_options and num_options == len(combos):
        return combos
    # the right pair, a pair sharing only the first cue, one sharing only the second
    same_first = [(a, b) for a, b in combos if a == first and b != second]
    same_second = [(a, b) for a, b in combos if b == second and a != first]
    chosen = [(first, second)]
    for pool in (same_first, same_second):
        if pool and len(chosen) < num_options:
            chosen.append(pool[rng.integers(len(pool))])
    # then pairs sharing neither cue, so each medium alone still leaves two candidates
    neither = [(a, b) for a, b in combos if a != first and b != second]
    rest = [p for p in combos if p not in chosen and p not in neither]
    for pool in (neither, rest):
        order = rng.permutation(len(pool))
        chosen += [pool[i] for i in order[: num_options - len(chosen)]]
    if spec.shuffle_options:
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    else:
        chosen.sort(key=combos.index)
    return chosen


def choose_single(value: str, pool: Sequence[str], spec: SynthSpec, rng: np.random.Generator) -> list[str]:
    """Options for a one-cue question: ``value`` and up to ``num_options - 1`` others from ``pool``."""
    others = [p for p in pool if p != value]
    chosen = [value] + [others[i] for i in rng.permutation(len(others))[: spec.num_options - 1]]
    if spec.shuffle_options:
        return [chosen[i] for i in rng.permutation(len(chosen))]
    return sorted(chosen, key=list(pool).index)


def make_tone(tone: str, spec: SynthSpec, rng: np.random.Generator, seconds: float | None = None) -> np.ndarray:
    """``seconds`` (default ``spec.audio_seconds``) of the tone at ``spec.sample_rate``, float32."""
    n = int((spec.audio_seconds if seconds is None else seconds) * spec.sample_rate)
    t = np.arange(n) / spec.sample_rate
    freq = TONES_HZ[tone] * rng.uniform(0.95, 1.05)
    wave = 0.5 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    # the tone sounds for most of the clip, with a random start and short fades
    start = int(rng.uniform(0.0, 0.2) * n)
    stop = int(rng.uniform(0.8, 1.0) * n)
    envelope = np.zeros(n)
    envelope[start:stop] = 1.0
    fade = max(1, int(0.01 * spec.sample_rate))
    envelope[start : start + fade] *= np.linspace(0, 1, min(fade, stop - start))
    noise = rng.normal(0.0, 0.01, size=n)
    return (wave * envelope + noise).astype(np.float32)


def media_file(split_dir: Path, folder: str, name: str) -> tuple[Path, str]:
    """The file to write and its path relative to the split folder (the JSON's ``path`` value)."""
    (split_dir / folder).mkdir(parents=True, exist_ok=True)
    return split_dir / folder / name, f"{folder}/{name}"
