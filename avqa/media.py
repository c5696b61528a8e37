"""Audio and image loading with the reference run's preprocessing.

Both the rollout engines and the learner read media through these two functions, so the pixels and
samples each side sees are the same by construction.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from avqa.errors import MediaError

SAMPLE_RATE = 16_000
MAX_AUDIO_SECONDS = 10.0
PATCH_FACTOR = 28  # vision patch 14 × spatial merge 2
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28
MAX_ASPECT_RATIO = 200


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
