"""Audio and image loading: formats accepted, limits applied, broken files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avqa import MAX_PIXELS, MIN_PIXELS, MediaError, load_audio, load_image, smart_resize


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.mark.parametrize(
    ("name", "rate", "channels", "fmt"),
    [("a.wav", 16000, 1, "WAV"), ("b.flac", 48000, 2, "FLAC"), ("c.mp3", 44100, 1, "MP3"), ("d.ogg", 22050, 2, "OGG")],
)
def test_audio_formats_become_16k_mono(tmp_path: Path, name, rate, channels, fmt) -> None:
    path = tmp_path / name
    sf.write(path, tone(1.5, rate, channels), rate, format=fmt)
    samples = load_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    # mp3 encoders pad a frame or two; the others are exact after resampling
    expected = 24000
    assert abs(samples.size - expected) <= (2400 if fmt == "MP3" else 1)
    spectrum = np.abs(np.fft.rfft(samples[:16000]))
    assert abs(np.argmax(spectrum) - 440) <= 2  # 1 Hz bins: the tone survived resampling


def test_a_ten_minute_clip_is_cut_to_ten_seconds(tmp_path: Path) -> None:
    path = tmp_path / "long.wav"
    sf.write(path, tone(600, 8000), 8000)
    samples = load_audio(path)
    assert samples.size == 160_000
    assert load_audio(path, max_seconds=2.5).size == 40_000


def test_broken_audio_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    nan = tmp_path / "nan.wav"
    data = tone(1, 16000)
    data[100] = np.nan
    sf.write(nan, data, 16000, subtype="FLOAT")
    for path, reason in [
        (tmp_path / "missing.wav", "no such file"),
        (empty, "file is empty"),
        (garbage, "cannot decode audio"),
        (silent, "all zeros"),
        (nan, "non-finite"),
    ]:
        with pytest.raises(MediaError, match=reason) as info:
            load_audio(path)
        assert info.value.path == str(path) and str(path) in str(info.value)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.new("RGB", (200, 150), (200, 30, 30))
    img = rgb.convert(mode) if mode not in ("I;16",) else rgb.convert("L").convert("I;16")
    path = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.width % 28 == 0 and out.height % 28 == 0
    assert MIN_PIXELS <= out.width * out.height <= MAX_PIXELS


def test_image_size_limits_and_aspect(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (1920, 1080), (1, 2, 3)).save(big)
    out = load_image(big)
    assert out.width * out.height <= MAX_PIXELS and out.size == smart_resize(1080, 1920)[::-1]
    assert abs(out.width / out.height - 1920 / 1080) < 0.1
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 10), (1, 2, 3)).save(small)
    out = load_image(small)
    assert out.width * out.height >= MIN_PIXELS and out.size == (84, 56)
    custom = load_image(big, max_pixels=64 * 28 * 28)
    assert custom.width * custom.height <= 64 * 28 * 28
    assert smart_resize(448, 448) == (448, 448)
    assert smart_resize(500, 300) == (504, 308)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 5000)


def test_broken_images_are_named(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.new("RGB", (300, 300), (10, 200, 10)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in [(truncated, "cannot decode image"), (text, "cannot decode image"), (empty, "empty")]:
        with pytest.raises(MediaError, match=reason) as info:
            load_image(path)
        assert str(path) in str(info.value)
