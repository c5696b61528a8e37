"""A synthetic question set in the released AVQA-R1-6K layout, for every data_type.

``image_audio`` (the default): each image shows one coloured shape, each clip plays one tone; the
options name a colour *and* a pitch, so one medium alone narrows the answer to a half of the options
and only the pair fixes it. The single-medium kinds ask for one cue (``image``: the colour, ``audio``:
the pitch, ``text``: a fact stated in the question); the video kinds live in :mod:`avqa.synth_video`.
``mixed`` holds all six types. Offline and deterministic for a seed: the tests' and the embedded
default's data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw
from tqdm import tqdm

from avqa.record import DATA_TYPES, LETTERS
from avqa.synth_cues import (  # noqa: F401 (re-exported: avqa.synth is where users find them)
    COLOURS,
    DEMO_SPEC,
    DIRECTIONS,
    QUESTION,
    QUESTIONS,
    SHAPES,
    TONES_HZ,
    Question,
    SynthSpec,
    choose_pairs,
    choose_single,
    make_tone,
    media_file,
)
from avqa.synth_video import video_audio_question, video_question

KINDS = (*DATA_TYPES, "mixed")  # what `echoink data synth --kind` writes


def option_text(colour: str, tone: str) -> str:
    return f"a {colour} shape and a {tone} tone"


def choose_options(
    colour: str, tone: str, spec: SynthSpec, rng: np.random.Generator
) -> list[tuple[str, str]]:
    """The options as (colour, tone) pairs; exactly one matches both cues."""
    return choose_pairs(colour, tone, spec.colours, spec.tones, spec, rng)


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


def image_audio_question(name: str, split_dir: Path, spec: SynthSpec, rng: np.random.Generator) -> Question:
    colour = spec.colours[rng.integers(len(spec.colours))]
    tone = spec.tones[rng.integers(len(spec.tones))]
    options = choose_options(colour, tone, spec, rng)
    image, image_rel = media_file(split_dir, "images", f"{name}.jpg")
    audio, audio_rel = media_file(split_dir, "audios", f"{name}.wav")
    draw_image(colour, spec.image_size, rng, spec.shape_scale).save(image, quality=92)
    sf.write(audio, make_tone(tone, spec, rng), spec.sample_rate, subtype="PCM_16")
    return Question("image_audio", QUESTION, [option_text(c, t) for c, t in options],
                    options.index((colour, tone)), {"image": image_rel, "audio": audio_rel})


def image_question(name: str, split_dir: Path, spec: SynthSpec, rng: np.random.Generator) -> Question:
    colour = spec.colours[rng.integers(len(spec.colours))]
    options = choose_single(colour, spec.colours, spec, rng)
    image, rel = media_file(split_dir, "images", f"{name}.jpg")
    draw_image(colour, spec.image_size, rng, spec.shape_scale).save(image, quality=92)
    return Question("image", QUESTIONS["image"], [f"a {c} shape" for c in options], options.index(colour), {"image": rel})


def audio_question(name: str, split_dir: Path, spec: SynthSpec, rng: np.random.Generator) -> Question:
    tone = spec.tones[rng.integers(len(spec.tones))]
    options = choose_single(tone, spec.tones, spec, rng)
    audio, rel = media_file(split_dir, "audios", f"{name}.wav")
    sf.write(audio, make_tone(tone, spec, rng), spec.sample_rate, subtype="PCM_16")
    return Question("audio", QUESTIONS["audio"], [f"a {t} tone" for t in options], options.index(tone), {"audio": rel})


def text_question(name: str, split_dir: Path, spec: SynthSpec, rng: np.random.Generator) -> Question:
    # the answer is stated in the question: learnable from the words alone, no media
    colour = spec.colours[rng.integers(len(spec.colours))]
    options = choose_single(colour, spec.colours, spec, rng)
    return Question("text", QUESTIONS["text"].format(colour=colour), [f"a {c} ball" for c in options],
                    options.index(colour), {})


def question_makers() -> dict[str, Callable[[str, Path, SynthSpec, np.random.Generator], Question]]:
    """data_type → the function that writes one question's media and returns the question."""
    return {
        "image_audio": image_audio_question,
        "video_audio": video_audio_question,
        "video": video_question,
        "audio": audio_question,
        "image": image_question,
        "text": text_question,
    }


def synth_split(
    out_dir: Path,
    split: str,
    count: int,
    *,
    seed: int,
    spec: SynthSpec,
    id_offset: int = 0,
    kind: str = "image_audio",
    types: Sequence[str] = DATA_TYPES,
) -> Path:
    """Write one split (``train`` or ``valid``) of ``kind`` (a data_type or "mixed"); return its JSON file.

    ``mixed`` cycles through ``types`` (default all six data types), each block of them in a seeded
    order, so every type is present in any set of ``len(types)`` or more questions.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    unknown = [t for t in types if t not in DATA_TYPES]
    if unknown or not types:
        raise ValueError(f"types to mix: {list(types)}; each one of {', '.join(DATA_TYPES)}, at least one")
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    if kind == "image_audio":  # the layout's folders even for an empty split, as before
        (split_dir / "images").mkdir(exist_ok=True)
        (split_dir / "audios").mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    makers = question_makers()
    records: list[dict[str, Any]] = []
    block: list[str] = []
    for i in tqdm(range(count), desc=f"synth {split}", unit="q", disable=count < 200):
        if kind == "mixed":
            if not block:
                block = [types[j] for j in rng.permutation(len(types))]
            data_type = block.pop(0)
        else:
            data_type = kind
        q = makers[data_type](f"{split}_{i:06d}", split_dir, spec, rng)
        record: dict[str, Any] = {
            "problem_id": id_offset + i,
            "problem": q.problem,
            "data_type": q.data_type,
            "problem_type": "multiple choice",
            "options": [f"{LETTERS[k]}. {text}" for k, text in enumerate(q.options)],
            "solution": f"<answer>{LETTERS[q.gold]}</answer>",
        }
        if q.path:  # text questions carry no `path`
            record["path"] = q.path
        record["data_source"] = "synthetic"
        records.append(record)
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
    kind: str = "image_audio",
    types: Sequence[str] = DATA_TYPES,
) -> dict[str, Path]:
    """Write the train and valid splits of ``kind`` (see :data:`KINDS`; ``types``: what ``mixed``
    mixes); returns each split's JSON file."""
    spec = spec or SynthSpec()
    out = Path(out_dir)
    counts = {"train": train, "valid": val}
    paths = {}
    for split in splits:
        offset = 0 if split == "train" else 1_000_000
        paths[split] = synth_split(
            out, split, counts[split], seed=seed, spec=spec, id_offset=offset, kind=kind, types=types
        )
    return paths
