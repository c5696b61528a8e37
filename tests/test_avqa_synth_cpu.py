"""The synthetic set: the released layout, deterministic for a seed, and needing both media;
every data_type and the mixed set."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from avqa import load_audio, load_image, load_records, load_video
from avqa.synth import COLOURS, DEMO_SPEC, KINDS, TONES_HZ, SynthSpec, synth_dataset
from echoink.cli import main


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
    assert main(["data", "synth", "--demo", "--out", str(tmp_path / "a"), "--train", "4", "--val", "2"]) == 0
    synth_dataset(tmp_path / "b", train=4, val=2, seed=0, spec=DEMO_SPEC)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    train = load_records(tmp_path / "a" / "train" / "omni_rl_format_train.json")
    assert load_image(train[0].image_path).size == (56, 56)  # the demo's small pictures
    assert main(["data", "synth", "--demo", "--out", str(tmp_path / "c"), "--train", "4", "--val", "2",
                 "--image-size", "84"]) == 0
    synth_dataset(tmp_path / "d", train=4, val=2, seed=0, spec=dataclasses.replace(DEMO_SPEC, image_size=84))
    assert tree_digest(tmp_path / "c") == tree_digest(tmp_path / "d")


def _cues(image_path: Path, audio_path: Path | None) -> tuple[str, str]:
    """Read the colour and pitch back from the media, the way a perfect model would."""
    pixels = np.asarray(load_image(image_path), dtype=np.float32).reshape(-1, 3)
    saturation = pixels.max(axis=1) - pixels.min(axis=1)
    shape_rgb = pixels[saturation > 80].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.linalg.norm(np.array(COLOURS[c]) - shape_rgb))
    if audio_path is None:
        return colour, ""
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


# ---- the other data types and the mixed set

MEDIA_KEYS = {
    "image_audio": {"image", "audio"},
    "video_audio": {"video"},
    "video": {"video"},
    "audio": {"audio"},
    "image": {"image"},
    "text": None,  # no `path` key at all
}
SUFFIX = {"image": ".jpg", "audio": ".wav", "video": ".mp4"}


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "image_audio"])
def test_each_kind_writes_the_layout(tmp_path: Path, kind: str) -> None:
    paths = synth_dataset(tmp_path, train=6, val=2, seed=0, spec=DEMO_SPEC, kind=kind)
    raw = json.loads(paths["train"].read_text())
    types = [r["data_type"] for r in raw]
    assert set(types) == (set(MEDIA_KEYS) if kind == "mixed" else {kind})  # six questions: every type
    for rec in raw:
        wanted = MEDIA_KEYS[rec["data_type"]]
        assert (set(rec["path"]) if "path" in rec else None) == wanted
        for medium, rel in (rec.get("path") or {}).items():
            assert rel.endswith(SUFFIX[medium]) and (tmp_path / "train" / rel).stat().st_size > 0
    records = load_records(paths["train"]) + load_records(paths["valid"])
    assert [r.data_type for r in records[:6]] == types
    for rec in records:
        assert (rec.video_path is not None) == (rec.data_type in ("video", "video_audio"))
        if rec.video_path is not None:
            video = load_video(rec.video_path, with_audio=rec.data_type == "video_audio")
            assert video.frames.shape == (4, 56, 56, 3)  # the demo's 2 s at 2 fps
            assert (video.audio is not None) == (rec.data_type == "video_audio")


def test_mixed_is_deterministic_and_cli_matches(tmp_path: Path) -> None:
    assert main(["data", "synth", "--kind", "mixed", "--demo", "--out", str(tmp_path / "a"),
                 "--train", "7", "--val", "2", "--seed", "5"]) == 0
    synth_dataset(tmp_path / "b", train=7, val=2, seed=5, spec=DEMO_SPEC, kind="mixed")
    synth_dataset(tmp_path / "c", train=7, val=2, seed=6, spec=DEMO_SPEC, kind="mixed")
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert a == b and a != c  # mp4s included: same seed, same bytes
    assert any(k.endswith(".mp4") for k in a)
    from echoink.cli import build_parser

    parser = build_parser()
    # the CLI spells the kinds out (its --help imports nothing): every kind parses, others do not
    assert [parser.parse_args(["data", "synth", "--out", "x", "--kind", k]).kind for k in KINDS] == list(KINDS)
    assert parser.parse_args(["data", "synth", "--out", "x"]).kind == "image_audio"
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--out", "x", "--kind", "smell"])


def _shape_mask(frame: np.ndarray) -> np.ndarray:
    rgb = frame.astype(np.float32)
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 100  # saturated: the shape (the background stays below ~90)


def _shift(first: np.ndarray, last: np.ndarray) -> int:
    """How far a wrap-around profile moved, in (-n/2, n/2]: the peak of their circular correlation."""
    corr = np.fft.irfft(np.fft.rfft(last) * np.conj(np.fft.rfft(first)), n=first.size)
    shift = int(np.argmax(corr))
    return shift - first.size if shift > first.size // 2 else shift


def _motion(frames: np.ndarray) -> str:
    """The way the shape moves between the first frame and the last, across the frame's wrap."""
    first, last = _shape_mask(frames[0]), _shape_mask(frames[-1])
    dx = _shift(first.sum(axis=0).astype(float), last.sum(axis=0).astype(float))
    dy = _shift(first.sum(axis=1).astype(float), last.sum(axis=1).astype(float))
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def _pitch(samples: np.ndarray) -> str:
    freq = np.argmax(np.abs(np.fft.rfft(samples))) * 16000 / samples.size
    return min(TONES_HZ, key=lambda t: abs(np.log(TONES_HZ[t] / freq)))


def test_video_audio_answer_needs_motion_and_sound(tmp_path: Path) -> None:
    spec = dataclasses.replace(DEMO_SPEC, directions=("left", "right", "up", "down"), tones=("low", "high", "middle"),
                               shuffle_options=True)
    paths = synth_dataset(tmp_path, train=24, val=0, seed=2, spec=spec, splits=("train",), kind="video_audio")
    letters = Counter()
    seen = set()
    for rec in load_records(paths["train"]):
        video = load_video(rec.video_path, with_audio=True)
        direction, pitch = _motion(video.frames), _pitch(video.audio)
        seen.add((direction, pitch))
        texts = [o.split(". ", 1)[1] for o in rec.options]
        by_motion = [t for t in texts if f"moving {direction} " in t]
        by_pitch = [t for t in texts if t.endswith(f"a {pitch} tone")]
        both = [t for t in by_motion if t in by_pitch]
        assert len(texts) == 4 and len(by_motion) == 2 and len(by_pitch) == 2 and len(both) == 1
        assert rec.options[rec.letters.index(rec.answer)].endswith(both[0])
        letters[rec.answer] += 1
    assert set(letters) == set("ABCD") and len({d for d, _ in seen}) == 4


def test_one_frame_does_not_tell_the_direction(tmp_path: Path) -> None:
    """The shape starts anywhere on a wrap-around frame: left- and right-movers' first frames put it
    in either half alike (a start on one side would give the way away without the frames' order)."""
    paths = synth_dataset(tmp_path, train=40, val=0, seed=3, spec=DEMO_SPEC, splits=("train",), kind="video")
    halves: dict[str, set[bool]] = {"left": set(), "right": set()}
    for rec in load_records(paths["train"]):
        frames = load_video(rec.video_path).frames
        direction = _motion(frames)
        assert rec.options[rec.letters.index(rec.answer)].endswith(f"moving {direction}")
        cols = np.nonzero(_shape_mask(frames[0]).any(axis=0))[0]
        if cols.size and not (cols.min() == 0 and cols.max() == frames.shape[2] - 1):  # not split by the wrap
            halves[direction].add(cols.mean() > frames.shape[2] / 2)
    assert halves == {"left": {False, True}, "right": {False, True}}


def test_single_medium_kinds_need_their_medium(tmp_path: Path) -> None:
    spec = dataclasses.replace(DEMO_SPEC, directions=("left", "right", "up", "down"))
    for kind in ("video", "audio", "image", "text"):
        paths = synth_dataset(tmp_path / kind, train=8, val=0, seed=4, spec=spec, splits=("train",), kind=kind)
        for rec in load_records(paths["train"]):
            gold = rec.options[rec.letters.index(rec.answer)].split(". ", 1)[1]
            if kind == "video":
                cue = f"a shape moving {_motion(load_video(rec.video_path).frames)}"
                assert len(rec.options) == 4
            elif kind == "audio":
                cue = f"a {_pitch(load_audio(rec.audio_path))} tone"
            elif kind == "image":
                cue = _cues(rec.image_path, None)[0]
                cue = f"a {cue} shape"
            else:
                stated = next(c for c in COLOURS if f"the ball inside is {c}." in rec.question)
                cue = f"a {stated} ball"
            assert gold == cue, (kind, rec.id)
