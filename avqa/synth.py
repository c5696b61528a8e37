"""A synthetic audio-image question set in the released AVQA-R1-6K layout.

Each image shows one coloured shape; each clip plays one tone. The options name a colour *and* a
pitch, so one medium alone narrows the answer to a half of the options and only the pair fixes it.
Offline and deterministic for a seed: the tests' and the embedded default's data.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from tqdm import tqdm

from avqa.record import LETTERS

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
QUESTION = (
    "The picture shows a coloured shape and the sound clip plays a tone. "
    "Which option names both the colour of the shape and the pitch of the tone?"
)


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

    def __post_init__(self) -> None:
        unknown = [c for c in self.colours if c not in COLOURS] + [t for t in self.tones if t not in TONES_HZ]
        if unknown:
            raise ValueError(f"unknown colour or tone: {unknown}; known: {sorted(COLOURS)} / {sorted(TONES_HZ)}")
        if len(self.colours) < 2 or len(self.tones) < 2:
            raise ValueError("need at least two colours and two tones so that each medium matters")
        if not 2 <= self.num_options <= len(self.colours) * len(self.tones):
            raise ValueError(f"num_options must be between 2 and {len(self.colours) * len(self.tones)}")
        if self.image_size < 28 or self.audio_seconds <= 0:
            raise ValueError("image_size must be ≥ 28 pixels and audio_seconds > 0")
        if not 0 < self.shape_scale[0] <= self.shape_scale[1] <= 1:
            raise ValueError(f"shape_scale must satisfy 0 < low ≤ high ≤ 1, got {self.shape_scale}")


# `make demo`'s data: small media keep a CPU step near a second; a shape filling most of the picture
# makes the colour cue as easy for a tiny random vision tower as the pitch is for its audio tower
DEMO_SPEC = SynthSpec(image_size=56, audio_seconds=1.0, shape_scale=(0.8, 1.0))


def option_text(colour: str, tone: str) -> str:
    return f"a {colour} shape and a {tone} tone"


def choose_options(
    colour: str, tone: str, spec: SynthSpec, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """The options as (colour, tone) pairs; exactly one matches both cues."""
    combos = list(itertools.product(spec.colours, spec.tones))
    if not spec.shuffle_options and spec.num_options == len(combos):
        return combos
    # the right pair, a pair sharing only the colour, one sharing only the tone
    same_colour = [(c, t) for c, t in combos if c == colour and t != tone]
    same_tone = [(c, t) for c, t in combos if t == tone and c != colour]
    chosen = [(colour, tone)]
    for pool in (same_colour, same_tone):
        if pool and len(chosen) < spec.num_options:
            chosen.append(pool[rng.integers(len(pool))])
    # then pairs sharing neither cue, so each medium alone still leaves two candidates
    neither = [(c, t) for c, t in combos if c != colour and t != tone]
    rest = [p for p in combos if p not in chosen and p not in neither]
    for pool in (neither, rest):
        order = rng.permutation(len(pool))
        chosen += [pool[i] for i in order[: spec.num_options - len(chosen)]]
    if spec.shuffle_options:
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    else:
        chosen.sort(key=combos.index)
    return chosen


def draw_image(colour: str, size: int, rng: np.random.Generator, scale: tuple[float, float] = (0.4, 0.7)) -> Image.Image:
    base = rng.integers(170, 235, size=3)
    noise = rng.integers(-12, 13, size=(size, size, 3))
    pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    extent = max(1, int(size * rng.uniform(*scale)))
    x0 = int(rng.integers(0, size - extent + 1))
    y0 = int(rng.integers(0, size - extent + 1))
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    shape = SHAPES[rng.integers(len(SHAPES))]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return img


def make_tone(tone: str, spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    n = int(spec.audio_seconds * spec.sample_rate)
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


def synth_split(out_dir: Path, split: str, count: int, *, seed: int, spec: SynthSpec, id_offset: int = 0) -> Path:
    """Write one split (``train`` or ``valid``) and return its JSON file."""
    split_dir = out_dir / split
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "audios").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    records = []
    for i in tqdm(range(count), desc=f"synth {split}", unit="q", disable=count < 200):
        colour = spec.colours[rng.integers(len(spec.colours))]
        tone = spec.tones[rng.integers(len(spec.tones))]
        options = choose_options(colour, tone, spec, rng)
        gold = LETTERS[options.index((colour, tone))]
        name = f"{split}_{i:06d}"
        draw_image(colour, spec.image_size, rng, spec.shape_scale).save(split_dir / "images" / f"{name}.jpg", quality=92)
        sf.write(split_dir / "audios" / f"{name}.wav", make_tone(tone, spec, rng), spec.sample_rate, subtype="PCM_16")
        records.append(
            {
                "problem_id": id_offset + i,
                "problem": QUESTION,
                "data_type": "image_audio",
                "problem_type": "multiple choice",
                "options": [f"{LETTERS[k]}. {option_text(c, t)}" for k, (c, t) in enumerate(options)],
                "solution": f"<answer>{gold}</answer>",
                "path": {"image": f"images/{name}.jpg", "audio": f"audios/{name}.wav"},
                "data_source": "synthetic",
            }
        )
    json_path = split_dir / f"omni_rl_format_{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return json_path


def synth_dataset(
    out_dir: str | Path,
    *,
    train: int,
    val: int,
    seed: int = 0,
    spec: SynthSpec | None = None,
    splits: Sequence[str] = ("train", "valid"),
) -> dict[str, Path]:
    """Write the train and valid splits; returns each split's JSON file."""
    spec = spec or SynthSpec()
    out = Path(out_dir)
    counts = {"train": train, "valid": val}
    paths = {}
    for split in splits:
        offset = 0 if split == "train" else 1_000_000
        paths[split] = synth_split(out, split, counts[split], seed=seed, spec=spec, id_offset=offset)
    return paths
