"""The synthetic set: the released layout, deterministic for a seed, and needing both media."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np

from avqa import load_audio, load_image, load_records
from avqa.synth import COLOURS, TONES_HZ, SynthSpec, synth_dataset
from orchestrator.cli import main


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_determinism(tmp_path: Path) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--train", "6", "--val", "3", "--seed", "3"]) == 0
    synth_dataset(tmp_path / "b", train=6, val=3, seed=3)
    synth_dataset(tmp_path / "c", train=6, val=3, seed=4)
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert "train/omni_rl_format_train.json" in a and "valid/omni_rl_format_valid.json" in a
    assert sum(k.startswith("train/images/") and k.endswith(".jpg") for k in a) == 6
    assert sum(k.startswith("valid/audios/") and k.endswith(".wav") for k in a) == 3
    train = load_records(tmp_path / "a" / "train" / "omni_rl_format_train.json")
    valid = load_records(tmp_path / "a" / "valid" / "omni_rl_format_valid.json")
    assert not {r.id for r in train} & {r.id for r in valid}


def test_demo_preset_is_the_demo_spec_and_flags_override(tmp_path: Path) -> None:
    import dataclasses

    from avqa.synth import DEMO_SPEC

    assert main(["data", "synth", "--demo", "--out", str(tmp_path / "a"), "--train", "4", "--val", "2"]) == 0
    synth_dataset(tmp_path / "b", train=4, val=2, seed=0, spec=DEMO_SPEC)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    train = load_records(tmp_path / "a" / "train" / "omni_rl_format_train.json")
    assert load_image(train[0].image_path).size == (56, 56)  # the demo's small pictures
    assert main(["data", "synth", "--demo", "--out", str(tmp_path / "c"), "--train", "4", "--val", "2",
                 "--image-size", "84"]) == 0
    synth_dataset(tmp_path / "d", train=4, val=2, seed=0, spec=dataclasses.replace(DEMO_SPEC, image_size=84))
    assert tree_digest(tmp_path / "c") == tree_digest(tmp_path / "d")


def _cues(image_path: Path, audio_path: Path) -> tuple[str, str]:
    """Read the colour and pitch back from the media, the way a perfect model would."""
    pixels = np.asarray(load_image(image_path), dtype=np.float32).reshape(-1, 3)
    saturation = pixels.max(axis=1) - pixels.min(axis=1)
    shape_rgb = pixels[saturation > 80].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(np.array(COLOURS[c]) - shape_rgb))
    samples = load_audio(audio_path)
    freq = np.argmax(np.abs(np.fft.rfft(samples))) * 16000 / samples.size
    pitch = min(TONES_HZ, key=lambda t: abs(np.log(TONES_HZ[t] / freq)))
    return colour, pitch


def test_answer_needs_both_media(tmp_path: Path) -> None:
    spec = SynthSpec(colours=("red", "blue", "green"), tones=("low", "high"), shuffle_options=True)
    paths = synth_dataset(tmp_path, train=40, val=0, seed=1, spec=spec, splits=("train",))
    records = load_records(paths["train"])
    letters = Counter()
    for rec in records:
        colour, pitch = _cues(rec.image_path, rec.audio_path)
        texts = [o.split(". ", 1)[1] for o in rec.options]
        by_colour = [t for t in texts if f"a {colour} shape" in t]
        by_pitch = [t for t in texts if f"a {pitch} tone" in t]
        both = [t for t in texts if t in by_colour and t in by_pitch]
        assert len(rec.options) == 4
        assert len(by_colour) == 2 and len(by_pitch) == 2 and len(both) == 1
        assert rec.options[rec.letters.index(rec.answer)].endswith(both[0])
        letters[rec.answer] += 1
    assert set(letters) == set("ABCD")  # shuffled options spread the gold letter


def test_fixed_order_lists_every_combination(tmp_path: Path) -> None:
    paths = synth_dataset(tmp_path, train=8, val=0, seed=0, splits=("train",))
    raw = json.loads(paths["train"].read_text())
    options = {tuple(r["options"]) for r in raw}
    assert options == {
        (
            "A. a red shape and a low tone",
            "B. a red shape and a high tone",
            "C. a blue shape and a low tone",
            "D. a blue shape and a high tone",
        )
    }
