"""Audio, image and video loading with the reference run's preprocessing.

Both the rollout engines and the learner read media through these functions, so the pixels and
samples each side sees are the same by construction.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from avqa.errors import MediaError

if TYPE_CHECKING:
    from av.container import InputContainer

SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 10.0
PATCH_FACTOR = 28  # vision patch 14 × spatial merge 2
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
MAX_ASPECT_RATIO = 200
# Video. Qwen2.5-Omni's processor assumes 2 frames a second when it is given none and
# qwen-omni-utils samples at 2 fps, so the model's time axis (25 position ids a second,
# 2-s audio/video chunks with use_audio_in_video) is calibrated for that rate.
VIDEO_FPS = 2.0
# 16 frames = 8 s at 2 fps. The vision tower folds 2 frames into one temporal patch, so a video
# costs (frames / 2) × (pixels / 28²) tokens: at most 8 × 128 = 1,024 here, four images' worth.
MAX_VIDEO_FRAMES = 16
# Per frame. Qwen2-VL's video processor spans 128·28² … 768·28² for real footage; its 128·28²
# floor would blow a 56-px synthetic clip up to ~320 px, so the floor is the images' own 4·28² and
# the cap half the images' 256·28², keeping a 16-frame video near the cost of a few pictures.
# Callers that hand frames to a transformers processor pass these limits to it too, or it resizes
# them again to its own.
VIDEO_MIN_PIXELS = 4 * 28 * 28
VIDEO_MAX_PIXELS = 128 * 28 * 28
TEMPORAL_PATCH = 2  # frames per temporal patch of the vision tower: a video holds an even count


def load_audio(
    path: str | Path,
    *,
    sample_rate: int = SAMPLE_RATE,
    max_seconds: float = MAX_AUDIO_SECONDS,
) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``, at most the first ``max_seconds``."""
    import librosa

    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns before its audioread fallback
            samples, _ = librosa.load(path, sr=sample_rate, mono=True, duration=max_seconds)
    except Exception as exc:  # librosa raises many types for unreadable input
        if "not finite" in str(exc):
            raise MediaError(path, "audio holds non-finite samples (corrupt file)") from None
        raise MediaError(path, f"cannot decode audio: {type(exc).__name__}: {exc}") from None
    samples = np.asarray(samples, dtype=np.float32)
    if samples.size == 0:
        raise MediaError(path, "audio holds no samples")
    if not np.all(np.isfinite(samples)):
        raise MediaError(path, "audio holds non-finite samples (corrupt file)")
    if not np.any(samples):
        raise MediaError(path, "audio is all zeros (silent or corrupt)")
    return samples


def load_image(
    path: str | Path,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> Image.Image:
    """An RGB image resized to multiples of 28 with ``min_pixels`` ≤ area ≤ ``max_pixels``."""
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
            rgb = _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"cannot decode image: {type(exc).__name__}: {exc}") from None
    try:
        return prepare_image(rgb, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise MediaError(path, str(exc)) from None


def prepare_image(image: Image.Image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The same conversion as :func:`load_image` for an image already in memory."""
    rgb = _to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (height, width) != (rgb.height, rgb.width):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return rgb


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class Video:
    """Frames sampled at a fixed rate, and the file's own sound track when asked for."""

    frames: np.ndarray  # uint8 [T, H, W, 3], RGB; T even and ≥ 2; H and W multiples of 28
    fps: float  # the rate the frames were sampled at: frame k shows time k / fps
    audio: np.ndarray | None = None  # mono float32 at the loader's sample rate, or None


def load_video(
    path: str | Path,
    *,
    fps: float = VIDEO_FPS,
    max_frames: int = MAX_VIDEO_FRAMES,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    with_audio: bool = False,
    sample_rate: int = SAMPLE_RATE,
    max_audio_seconds: float = MAX_AUDIO_SECONDS,
) -> Video:
    """Frames sampled at ``fps`` from the start (at most ``max_frames``), and with ``with_audio``
    the file's sound track as mono float32 at ``sample_rate``, at most ``max_audio_seconds``.

    Frame k is the decoded frame on screen at time k / ``fps`` (the latest one whose timestamp is
    at or before it); sampling stops at the end of the video. An odd count drops its last frame
    and a one-frame video shows its frame twice, since the vision tower reads frames in pairs.
    """
    import av

    if fps <= 0 or max_frames < TEMPORAL_PATCH:
        raise ValueError(f"need fps > 0 and max_frames ≥ {TEMPORAL_PATCH}, got fps={fps}, max_frames={max_frames}")
    path = Path(path)
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(path, "file holds no video stream (an audio-only or truncated file?)")
            frames = _sample_frames(container, fps, max_frames)
        audio = None
        if with_audio:
            with av.open(str(path)) as container:  # a second pass: the first may have stopped early
                audio = _decode_track(container, path, sample_rate, max_audio_seconds)
    except (av.FFmpegError, OSError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(path, f"cannot decode video: {type(exc).__name__}: {exc}") from None
    if not frames:
        raise MediaError(path, "video holds no frames")
    try:
        return prepare_video(frames, fps, min_pixels=min_pixels, max_pixels=max_pixels, audio=audio)
    except ValueError as exc:
        raise MediaError(path, str(exc)) from None


def prepare_video(
    frames: np.ndarray | Sequence[np.ndarray | Image.Image],
    fps: float,
    *,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    audio: np.ndarray | None = None,
) -> Video:
    """The same conversion as :func:`load_video` for frames already in memory, sampled at ``fps``.

    Every frame becomes RGB at one size, the first frame's :func:`smart_resize` (bicubic, like
    :func:`prepare_image`); an odd count drops its last frame, a single frame is shown twice.
    """
    if len(frames) == 0:
        raise ValueError("video holds no frames")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    frames = list(frames) * TEMPORAL_PATCH if len(frames) == 1 else list(frames)
    frames = frames[: len(frames) - len(frames) % TEMPORAL_PATCH]
    images = [_to_rgb(f if isinstance(f, Image.Image) else Image.fromarray(_frame_array(f))) for f in frames]
    height, width = smart_resize(images[0].height, images[0].width, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = [
        img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BICUBIC)
        for img in images
    ]
    stacked = np.stack([np.asarray(img, dtype=np.uint8) for img in resized])
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
    return Video(frames=stacked, fps=float(fps), audio=audio)


def _frame_array(frame: np.ndarray) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"a frame must be uint8 [H, W, 3 or 4], got {arr.dtype} {list(arr.shape)}")
    return arr


def _sample_frames(container: InputContainer, fps: float, max_frames: int) -> list[np.ndarray]:
    """RGB arrays of the frames on screen at 0, 1/fps, 2/fps, …, until the video or the cap ends."""
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0) or None
    eps = 1e-3  # seconds: timestamps are rounded to the stream's time base
    picked: list = []  # av.VideoFrame, converted to RGB only once chosen
    prev = None  # (frame, time from the first frame)
    start = None
    for index, frame in enumerate(container.decode(stream)):
        if frame.pts is not None and frame.time_base is not None:
            t = float(frame.pts * frame.time_base)
        elif rate:
            t = index / rate
        else:
            t = index / fps  # no clock at all: read the frames as sampled already
        start = t if start is None else start
        t -= start
        while prev is not None and len(picked) < max_frames and t > len(picked) / fps + eps:
            picked.append(prev[0])  # prev is the last frame at or before that instant
        if len(picked) >= max_frames:
            break
        prev = (frame, t)
    else:  # the stream ended before the cap: the last frame stays on screen for its duration
        if prev is not None:
            frame, t = prev
            if frame.duration and frame.time_base is not None:
                shown = float(frame.duration * frame.time_base)
            else:
                shown = 1.0 / rate if rate else 1.0 / fps
            while len(picked) < max_frames and len(picked) / fps < t + shown - eps:
                picked.append(frame)
    return [f.to_ndarray(format="rgb24") for f in picked]


def _decode_track(container: InputContainer, path: Path, sample_rate: int, max_seconds: float) -> np.ndarray:
    """The file's first audio stream, checked like :func:`load_audio`'s clips.

    Decoded to float at its own rate, averaged over channels and resampled with soxr_hq: the same
    downmix and resampler as librosa.load in :func:`load_audio` (swresample's downmix weighs
    channels differently), so a lossless sound track and the same sound as its own file reach the
    model as the same samples; soxr is deterministic.
    """
    import av
    import librosa

    if not container.streams.audio:
        raise MediaError(path, "video has no audio track; data_type video_audio needs one — use data_type video")
    stream = container.streams.audio[0]
    native = stream.rate
    limit = math.ceil(max_seconds * native)
    if stream.duration is not None and stream.time_base is not None:
        # the track's declared length: AAC decoders hand out the encoder's end padding after it
        limit = min(limit, round(float(stream.duration * stream.time_base) * native))
    chunks: list[np.ndarray] = []
    held = 0
    resampler = None
    try:
        for frame in container.decode(stream):
            if resampler is None:
                # a format conversion only (planar float, same layout and rate)
                resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=native)
            for out in resampler.resample(frame):
                chunk = out.to_ndarray()  # [channels, samples]
                chunks.append(chunk.mean(axis=0))
                held += chunk.shape[1]
            if held >= limit:
                break
    except (av.FFmpegError, ValueError) as exc:
        raise MediaError(path, f"cannot decode the audio track: {type(exc).__name__}: {exc}") from None
    samples = np.concatenate(chunks)[:limit] if chunks else np.zeros(0, dtype=np.float32)
    if samples.size and native != sample_rate:
        samples = librosa.resample(samples, orig_sr=native, target_sr=sample_rate, res_type="soxr_hq")
    samples = np.asarray(samples[: int(max_seconds * sample_rate)], dtype=np.float32)
    if samples.size == 0:
        raise MediaError(path, "audio track holds no samples")
    if not np.all(np.isfinite(samples)):
        raise MediaError(path, "audio track holds non-finite samples (corrupt file)")
    if not np.any(samples):
        raise MediaError(path, "audio track is all zeros (silent or corrupt)")
    return samples


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = PATCH_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """Closest size in multiples of ``factor`` within the pixel limits, keeping the aspect ratio."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels ({width}×{height})")
    if min_pixels <= 0 or max_pixels < min_pixels:
        raise ValueError(f"bad pixel limits: min_pixels={min_pixels}, max_pixels={max_pixels}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {width}×{height} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise MediaError(path, "no such file")
    if path.stat().st_size == 0:
        raise MediaError(path, "file is empty")
