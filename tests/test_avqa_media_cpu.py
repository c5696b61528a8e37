"""Audio, image and video loading: formats accepted, limits applied, broken files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avqa import (
    MAX_PIXELS,
    MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    MediaError,
    Video,
    load_audio,
    load_image,
    load_video,
    prepare_video,
    smart_resize,
)
from avqa.synth_video import write_clip


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


# ---- video


def numbered_clip(path: Path, count: int, fps: float, size: tuple[int, int] = (84, 112), **write: object) -> Path:
    """A clip whose frame i is a flat grey of level 8·i, so a sampled frame names its index."""
    height, width = size
    frames = np.stack([np.full((height, width, 3), 8 * i, np.uint8) for i in range(count)])
    return write_clip(path, frames, fps, **write)  # type: ignore[arg-type]


def frame_indices(video: Video) -> list[int]:
    return [round(float(f.mean()) / 8) for f in video.frames]


# the synthetic set's encoder, and H.264 with B-frames (decoded out of order, as most real clips are)
@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_video_frames_are_sampled_at_the_rate(tmp_path: Path, codec: str) -> None:
    clip = numbered_clip(tmp_path / "n.mp4", 30, 10.0, codec=codec)  # 3 s, frame i shown over [i/10, (i+1)/10)
    video = load_video(clip, fps=2.0)
    assert video.frames.dtype == np.uint8 and video.frames.shape == (6, 84, 112, 3) and video.fps == 2.0
    assert frame_indices(video) == [0, 5, 10, 15, 20, 25]
    # 3 fps: instants 0, 1/3, 2/3, 1, … show frames 0, 3, 6, 10, … (the one on screen, not the
    # nearest: 2/3 s shows frame 6, not 7); 9 instants fit in 3 s and the odd last one is dropped
    assert frame_indices(load_video(clip, fps=3.0)) == [0, 3, 6, 10, 13, 16, 20, 23]
    assert frame_indices(load_video(clip, fps=2.0, max_frames=4)) == [0, 5, 10, 15]
    assert frame_indices(load_video(clip, fps=20.0, max_frames=6)) == [0, 0, 1, 1, 2, 2]  # faster than the file


def test_video_frame_counts_are_even(tmp_path: Path) -> None:
    five = numbered_clip(tmp_path / "five.mp4", 5, 2.0)  # 2.5 s: instants 0 … 2 s, five of them
    assert frame_indices(load_video(five)) == [0, 1, 2, 3]
    one = numbered_clip(tmp_path / "one.mp4", 1, 2.0, size=(56, 56))
    video = load_video(one)
    assert video.frames.shape == (2, 56, 56, 3) and np.array_equal(video.frames[0], video.frames[1])


def test_video_frames_are_resized_within_the_limits(tmp_path: Path) -> None:
    big = numbered_clip(tmp_path / "big.mp4", 4, 2.0, size=(480, 640))
    video = load_video(big)
    assert video.frames.shape == (4, 252, 364, 3)  # smart_resize under 128·28² pixels a frame
    assert smart_resize(480, 640, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS) == (252, 364)
    assert load_video(big, max_pixels=16 * 28 * 28).frames.shape[1:3] == (84, 112)
    tiny = numbered_clip(tmp_path / "tiny.mp4", 2, 2.0, size=(20, 30))
    assert load_video(tiny, min_pixels=9 * 28 * 28).frames.shape[1:3] == (84, 112)


def test_prepare_video_matches_load_video(tmp_path: Path) -> None:
    clip = numbered_clip(tmp_path / "n.mp4", 6, 2.0, size=(150, 200))
    loaded = load_video(clip)
    import av

    with av.open(str(clip)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    prepared = prepare_video(decoded, 2.0)
    assert prepared.frames.shape == loaded.frames.shape == (6, 140, 196, 3)
    assert np.array_equal(prepared.frames, loaded.frames)  # one resize for both
    odd = prepare_video([Image.fromarray(f) for f in decoded[:3]], 2.0)
    assert odd.frames.shape[0] == 2 and odd.audio is None
    with pytest.raises(ValueError, match="no frames"):
        prepare_video([], 2.0)
    with pytest.raises(ValueError, match="uint8"):
        prepare_video(np.zeros((2, 28, 28, 3), np.float32), 2.0)


def test_video_sound_track(tmp_path: Path) -> None:
    rate = 48000
    t = np.arange(2 * rate) / rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    clip = numbered_clip(tmp_path / "s.mp4", 16, 8.0, audio=stereo, sample_rate=rate)
    video = load_video(clip, with_audio=True)
    assert video.audio.dtype == np.float32 and video.audio.ndim == 1
    assert video.audio.size == 32000  # 2 s at 16 kHz: the encoder's padding is cut off
    spectrum = np.abs(np.fft.rfft(video.audio[:16000]))  # 1 Hz bins
    peaks = sorted(int(i) for i in np.argsort(spectrum)[-2:])
    assert abs(peaks[0] - 440) <= 2 and abs(peaks[1] - 1000) <= 2  # both channels, mixed down
    assert np.nonzero(np.abs(video.audio) > 0.05)[0][0] < 40  # the tone starts at 0: priming skipped
    assert load_video(clip, with_audio=True, max_audio_seconds=0.5).audio.size == 8000
    assert load_video(clip).audio is None


def test_sound_track_is_read_like_load_audio(tmp_path: Path) -> None:
    """A lossless 48 kHz stereo track gives exactly load_audio's samples for the same sound as a wav:
    the same channel mean and the same soxr_hq resampler (swresample's downmix would differ)."""
    from fractions import Fraction

    import av

    rate = 48000
    t = np.arange(int(1.5 * rate)) / rate
    pcm = (np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 1000 * t)], axis=1) * 32767).astype(np.int16)
    sf.write(tmp_path / "sound.wav", pcm, rate, subtype="PCM_16")
    clip = tmp_path / "pcm.mkv"  # Matroska carries PCM (mp4 does not)
    with av.open(str(clip), "w") as container:
        video = container.add_stream("mpeg4", rate=4)
        video.width, video.height, video.pix_fmt = 56, 56, "yuv420p"
        sound = container.add_stream("pcm_s16le", rate=rate, layout="stereo")
        for i in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((56, 56, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 4)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout="stereo")
        chunk.sample_rate, chunk.pts, chunk.time_base = rate, 0, Fraction(1, rate)
        container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
    track = load_video(clip, with_audio=True).audio
    assert track.shape == (24000,)
    np.testing.assert_array_equal(track, load_audio(tmp_path / "sound.wav"))


def test_broken_videos_are_named(tmp_path: Path) -> None:
    import av

    good = numbered_clip(tmp_path / "good.mp4", 16, 8.0)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    scrambled = tmp_path / "scrambled.mp4"
    raw = bytearray(data)
    for i in range(1000, len(raw) - 1000, 7):  # keep the header, garble the coded frames
        raw[i] = (raw[i] * 31 + 7) % 256
    scrambled.write_bytes(bytes(raw))
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    silent = numbered_clip(tmp_path / "silent.mp4", 4, 2.0, audio=np.zeros(32000))
    # a video track without a single frame: Matroska keeps the empty track (mp4 drops it)
    no_frames = tmp_path / "no_frames.mkv"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 56, 56, "yuv420p"
        sound = container.add_stream("aac", rate=16000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(0.3 * np.ones((1, 4096), np.float32), format="flt", layout="mono")
        chunk.sample_rate = 16000
        container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
        container.mux(stream.encode(None))
    audio_only = tmp_path / "audio_only.mp4"
    with av.open(str(audio_only), "w") as container:
        sound = container.add_stream("aac", rate=16000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(0.3 * np.ones((1, 4096), np.float32), format="flt", layout="mono")
        chunk.sample_rate = 16000
        container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
    for path, reason, with_audio in [
        (tmp_path / "missing.mp4", "no such file", False),
        (empty, "file is empty", False),
        (text, "cannot decode video: InvalidDataError", False),
        (truncated, "cannot decode video: InvalidDataError", False),
        (scrambled, "cannot decode video: InvalidDataError", False),
        (no_frames, "video holds no frames", False),
        (audio_only, "file holds no video stream", False),
        (good, "video has no audio track; data_type video_audio needs one — use data_type video", True),
        (silent, "audio track is all zeros", True),
    ]:
        with pytest.raises(MediaError, match=reason) as info:
            load_video(path, with_audio=with_audio)
        assert info.value.path == str(path) and str(path) in str(info.value)
    assert load_video(good).frames.shape[0] == 4  # the same clip without asking for sound is fine
