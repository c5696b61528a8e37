"""A catalogue of malformed inputs across records, media and configs: each gets a clear error
naming what is wrong, or is accepted and handled the way a user would expect."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avqa import MediaError, RecordError, load_audio, load_image, load_records, load_video
from avqa.synth_video import write_clip
from orchestrator.config import ConfigError, load_config


def base_record(i: int) -> dict:
    return {
        "problem_id": i,
        "problem": "What is it?",
        "data_type": "image_audio",
        "problem_type": "multiple choice",
        "options": ["A. one", "B. two", "C. three", "D. four"],
        "solution": "<answer>B</answer>",
        "path": {"image": f"images/{i}.jpg", "audio": f"audios/{i}.wav"},
        "data_source": "test",
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "audios").mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "images" / f"{i}.jpg")
        sf.write(tmp_path / "audios" / f"{i}.wav", 0.2 * np.sin(np.arange(16000) / 5).astype(np.float32), 16000)
    return tmp_path


def write_json(root: Path, records: object, raw: bytes | None = None) -> Path:
    path = root / "data.json"
    path.write_bytes(raw if raw is not None else json.dumps(records).encode())
    return path


def huge_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims a giant size (a decompression bomb) without the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def record_case(mutate: Callable[[Path, dict], object]) -> Callable[[Path], object]:
    def run(root: Path) -> object:
        rec = base_record(1)
        payload = mutate(root, rec)
        return load_records(write_json(root, [base_record(0), rec] if payload is None else payload))

    return run


def symlink_out(root: Path, rec: dict) -> None:
    outside = root.parent / f"{root.name}-outside.wav"
    shutil.copy(root / "audios" / "0.wav", outside)
    os.symlink(outside, root / "audios" / "link.wav")
    rec["path"]["audio"] = "audios/link.wav"


def clip(root: Path, name: str, *, sound: bool = False, silent: bool = False) -> Path:
    """A 1-s, 56-px clip of 4 frames with a moving bar, and a 440 Hz (or silent) track when asked."""
    frames = np.full((4, 56, 56, 3), 200, np.uint8)
    for i in range(4):
        frames[i, :, 10 * i : 10 * i + 8] = (200, 30, 30)
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    audio = (0 * wave if silent else wave) if sound or silent else None
    return write_clip(root / name, frames, 4.0, audio=audio)


def damaged(root: Path, name: str, how: str) -> Path:
    """A good clip cut in half (its index, written last in an mp4, is lost) or with garbled frames."""
    data = bytearray(clip(root, "good.mp4").read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        for i in range(60, len(data) // 2, 5):  # the frames come first (from byte 44), the index last
            data[i] = (data[i] * 31 + 7) % 256
    (root / name).write_bytes(bytes(data))
    return root / name


CASES: list[tuple[str, Callable[[Path], object], type[Exception] | None, str]] = [
    # ---- records
    ("missing field", record_case(lambda r, rec: rec.pop("problem") and None), RecordError, "field 'problem': Field required"),
    ("wrong type", record_case(lambda r, rec: rec.update(options="A. one") or None), RecordError, "field 'options'"),
    ("boolean id", record_case(lambda r, rec: rec.update(problem_id=True) or None), RecordError, "integer or a string, got bool"),
    ("wrong encoding", lambda r: load_records(write_json(r, None, "[{\"problem\": \"caf\xe9\"}]".encode("latin-1"))), RecordError, "not UTF-8"),
    ("truncated JSON", lambda r: load_records(write_json(r, None, json.dumps([base_record(0)]).encode()[:-20])), RecordError, "invalid JSON"),
    ("empty file", lambda r: load_records(write_json(r, None, b"")), RecordError, "the file is empty"),
    ("path traversal", record_case(lambda r, rec: rec["path"].update(image="../../etc/passwd") or None), RecordError, "outside the dataset folder"),
    ("symlink out of the dataset folder", record_case(symlink_out), RecordError, "outside the dataset folder"),
    ("absolute media path", record_case(lambda r, rec: rec["path"].update(audio="/dev/zero") or None), RecordError, "absolute path"),
    ("gold letter not among options", record_case(lambda r, rec: rec.update(solution="<answer>F</answer>") or None), RecordError, "not among the options"),
    ("options out of order", record_case(lambda r, rec: rec.update(options=["B. two", "A. one"]) or None), RecordError, "options[0]"),
    ("duplicate id", record_case(lambda r, rec: rec.update(problem_id=0) or None), RecordError, "duplicate id"),
    ("missing media file", record_case(lambda r, rec: rec["path"].update(image="images/9.jpg") or None), RecordError, "does not exist"),
    ("huge question text is accepted", record_case(lambda r, rec: rec.update(problem="x" * 2_000_000) or None), None, ""),
    # ---- media
    ("truncated jpeg", lambda r: (r / "t.jpg").write_bytes((r / "images" / "0.jpg").read_bytes()[:200]) and load_image(r / "t.jpg"), MediaError, "cannot decode image"),
    ("empty wav", lambda r: (r / "e.wav").write_bytes(b"") or load_audio(r / "e.wav"), MediaError, "file is empty"),
    ("text saved as wav", lambda r: (r / "x.wav").write_text("hello") and load_audio(r / "x.wav"), MediaError, "cannot decode audio"),
    ("decompression bomb image", lambda r: huge_png_header(r / "bomb.png", 40000, 40000) or load_image(r / "bomb.png"), MediaError, "DecompressionBomb"),
    ("silent audio", lambda r: sf.write(r / "s.wav", np.zeros(8000, np.float32), 16000) or load_audio(r / "s.wav"), MediaError, "all zeros"),
    ("empty mp4", lambda r: (r / "e.mp4").write_bytes(b"") or load_video(r / "e.mp4"), MediaError, "file is empty"),
    ("text saved as mp4", lambda r: (r / "x.mp4").write_text("hello") and load_video(r / "x.mp4"), MediaError, "cannot decode video: InvalidDataError"),
    ("truncated mp4", lambda r: load_video(damaged(r, "t.mp4", "truncated")), MediaError, "cannot decode video: InvalidDataError"),
    ("corrupt mp4 frames", lambda r: load_video(damaged(r, "c.mp4", "garbled")), MediaError, "cannot decode video: InvalidDataError"),
    ("video_audio clip without a sound track", lambda r: load_video(clip(r, "v.mp4"), with_audio=True), MediaError,
     "video has no audio track; data_type video_audio needs one — use data_type video"),
    ("silent sound track", lambda r: load_video(clip(r, "s.mp4", silent=True), with_audio=True), MediaError, "audio track is all zeros"),
    ("audio file saved as mp4", lambda r: shutil.copy(r / "audios" / "0.wav", r / "a.mp4") and load_video(r / "a.mp4"), MediaError, "file holds no video stream"),
    ("video without sound is fine for data_type video", lambda r: load_video(clip(r, "ok.mp4")).frames.shape == (2, 56, 56, 3), None, ""),
    # ---- configs
    ("NaN in a config number", lambda r: load_config(None, ["grpo.beta=.nan"]), ConfigError, "grpo.beta"),
    ("negative size", lambda r: load_config(None, ["rollout.max_model_len=-5"]), ConfigError, "rollout.max_model_len"),
    ("G = 1", lambda r: load_config(None, ["grpo.group_size=1"]), ConfigError, "grpo.group_size"),
    ("unknown key", lambda r: load_config(None, ["learner.lr_sheduler=cosine"]), ConfigError, "learner.lr_sheduler: unknown key"),
    ("wrong type in config", lambda r: load_config(None, ["grpo.questions_per_step=many"]), ConfigError, "grpo.questions_per_step"),
    ("pixel limits reversed", lambda r: load_config(None, ["media.min_pixels=9000", "media.max_pixels=3136"]), ConfigError, "max_pixels"),
]


@pytest.mark.parametrize(("name", "case", "error", "words"), CASES, ids=[c[0] for c in CASES])
def test_catalogue(root: Path, name: str, case, error, words: str) -> None:
    if error is None:
        result = case(root)
        assert result  # accepted
        return
    with pytest.raises(error) as info:
        case(root)
    assert words in str(info.value)
    if error is RecordError:
        assert str(root / "data.json") in str(info.value)  # the file is named
    if error is MediaError:
        assert str(root) in str(info.value)


def test_accepted_media_are_normalised(root: Path) -> None:
    Image.new("L", (300, 200), 128).save(root / "grey.png")
    img = load_image(root / "grey.png")
    assert img.mode == "RGB" and img.size == (308, 196)
    t = np.arange(48000 * 3) / 48000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], axis=1).astype(np.float32) * 0.3
    sf.write(root / "stereo48k.flac", stereo, 48000)
    clip = load_audio(root / "stereo48k.flac")
    assert clip.ndim == 1 and clip.size == 48000  # 3 s at 16 kHz, mono
    sf.write(root / "long.wav", np.full(16000 * 600, 0.1, np.float32), 16000)  # ten minutes
    assert load_audio(root / "long.wav").size == 160_000


def test_more_engines_than_gpus() -> None:
    from orchestrator.config import load_config
    from orchestrator.plan import Cluster, layout_for

    config = load_config(None, ["rollout.num_engines=4", "learner.num_ranks=2", "placement.mode=split"])
    with pytest.raises(RuntimeError, match=r"needs 6 GPUs \(4 engine\(s\) × 1 \+ 2 learner rank\(s\)\) but the Ray cluster has 0"):
        layout_for(config, Cluster(use_gpus=True, gpus=0))


def test_pickled_weights_are_refused(tiny_checkpoint, synth_dir, tmp_path) -> None:
    import torch
    from safetensors.torch import load_file
    from test_train_e2e_cpu import tiny_config

    from orchestrator.trainer import train

    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_checkpoint, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    import ray

    started = ray.is_initialized()
    # refused before anything starts (Ray included), naming the folder and the pickled file
    with pytest.raises(FileNotFoundError, match=r"only safetensors are loaded \(found pickled weights \['pytorch_model.bin'\]"):
        train(tiny_config(folder, synth_dir, tmp_path / "run"), console=False)
    assert ray.is_initialized() == started
