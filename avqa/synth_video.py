"""The synthetic set's video kinds, and writing clips with PyAV.

``video``: a coloured shape moves across a still background; the options name directions, so the
answer needs the frames' order. ``video_audio``: the same clip with its own sound track playing a
tone; the options name a direction *and* a pitch, so the frames alone or the sound alone leave half
of the options (the image_audio design, with motion in place of colour).

The shape moves on a wrap-around frame (out at the right edge, back in at the left, like an arcade
screen) from a start drawn uniformly over the whole frame, so its place in any one frame is the same
for every direction: only the order of the frames tells which way it goes.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from avqa.synth_cues import (
    COLOURS,
    QUESTIONS,
    SHAPES,
    Question,
    SynthSpec,
    choose_pairs,
    choose_single,
    make_tone,
    media_file,
)

# MPEG-4 Part 2, not H.264: PyAV 18.1's libx264 (crf 12, one thread) wrote different bytes for the
# same frames from one call to the next in one process, at 56 and 84 px (sides of a 28-px patch
# grid that are not multiples of 16) with an AAC track in the file; FFmpeg's own mpeg4 encoder was
# byte-stable at 28-140 px. Any FFmpeg-based reader decodes it.
VIDEO_CODEC = "mpeg4"
VIDEO_OPTIONS = {
    # a bit rate these clips never reach, with the quantiser held at 2-4: near the ceiling that
    # 4:2:0 chroma leaves (29.5 dB against 30.2 dB for the colour conversion alone, 112 px)
    "b": "2M",
    "qmin": "2",
    "qmax": "4",
    "threads": "1",  # slices follow the thread count: one thread keeps the bytes machine-independent
}
AUDIO_BIT_RATE = 64_000  # per channel: AAC at 16 kHz keeps the full band to 8 kHz (the highest tone is 3 kHz)


def write_clip(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    *,
    audio: np.ndarray | None = None,
    sample_rate: int = 16_000,
    codec: str = VIDEO_CODEC,
    options: dict[str, str] | None = None,
) -> Path:
    """An mp4 of uint8 RGB ``frames`` [T, H, W, 3] (MPEG-4 video) at ``fps``, with ``audio`` as its AAC track:
    float samples, [N] for mono or [N, 2] for stereo (soundfile's layout). ``codec`` and its
    ``options`` (default :data:`VIDEO_OPTIONS` for the default codec) pick another video encoder."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [T ≥ 1, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"4:2:0 chroma needs an even frame size, got {frames.shape[2]}×{frames.shape[1]}")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        audio = audio[:, None] if audio.ndim == 1 else audio
        if audio.ndim != 2 or audio.shape[1] not in (1, 2) or audio.shape[0] == 0:
            raise ValueError(f"audio must be [N] or [N, 1 or 2] samples, got {list(audio.shape)}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format="mp4") as container:
        if options is None:
            options = VIDEO_OPTIONS if codec == VIDEO_CODEC else {}
        video = container.add_stream(codec, rate=rate, options=dict(options))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = None
        if audio is not None:
            layout = "mono" if audio.shape[1] == 1 else "stereo"
            sound = container.add_stream("aac", rate=sample_rate, layout=layout)
            sound.bit_rate = AUDIO_BIT_RATE * audio.shape[1]
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if sound is not None:
            wave = np.ascontiguousarray(audio.reshape(1, -1))  # packed: channels interleaved
            chunk = av.AudioFrame.from_ndarray(wave, format="flt", layout=layout)
            # a stamped first frame lets the encoder mark its 1,024 priming samples (an mp4 edit
            # list), which decoders then skip: the track starts with the tone's first sample
            chunk.sample_rate, chunk.pts, chunk.time_base = sample_rate, 0, Fraction(1, sample_rate)
            container.mux(sound.encode(chunk))
            container.mux(sound.encode(None))
    return path


# the distance travelled over the clip as a share of the frame: under half, so the shift between
# the first and the last frame reads one way only, even across the wrap
TRAVEL = (0.25, 0.45)


def moving_shape_frames(direction: str, spec: SynthSpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, S, S, 3]: a shape of a random colour and kind moving ``direction`` over a still
    background, wrapping around the frame's edges."""
    size = spec.image_size
    count = max(2, round(spec.video_seconds * spec.video_fps))
    base = rng.integers(170, 235, size=3)
    noise = rng.integers(-12, 13, size=(size, size, 3))
    background = Image.fromarray(np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8), "RGB")
    fill = COLOURS[list(COLOURS)[rng.integers(len(COLOURS))]]
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = max(2, round(size * spec.video_shape_scale))
    start = rng.uniform(0, size)
    travel = rng.uniform(*TRAVEL) * size * (1 if direction in ("right", "down") else -1)
    across = int(rng.integers(0, size - side + 1))  # the other axis: fixed, inside the frame
    out = []
    for k in range(count):
        along = round(start + travel * k / (count - 1)) % size
        img = background.copy()
        draw = ImageDraw.Draw(img)
        for wrapped in (along, along - size):  # the part past the far edge shows at the near one
            x0, y0 = (wrapped, across) if direction in ("left", "right") else (across, wrapped)
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(x0 + side // 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)], fill=fill)
        out.append(np.asarray(img))
    return np.stack(out)


def video_audio_question(name: str, split_dir: Path, spec: SynthSpec, rng: np.random.Generator) -> Question:
    direction = spec.directions[rng.integers(len(spec.directions))]
    tone = spec.tones[rng.integers(len(spec.tones))]
    options = choose_pairs(direction, tone, spec.directions, spec.tones, spec, rng)
    video, rel = media_file(split_dir, "videos", f"{name}.mp4")
    frames = moving_shape_frames(direction, spec, rng)
    sound = make_tone(tone, spec, rng, seconds=spec.video_seconds)
    write_clip(video, frames, spec.video_fps, audio=sound, sample_rate=spec.sample_rate)
    return Question("video_audio", QUESTIONS["video_audio"], [f"a shape moving {d} and a {t} tone" for d, t in options],
                    options.index((direction, tone)), {"video": rel})


def video_question(name: str, split_dir: Path, spec: SynthSpec, rng: np.random.Generator) -> Question:
    direction = spec.directions[rng.integers(len(spec.directions))]
    options = choose_single(direction, spec.directions, spec, rng)
    video, rel = media_file(split_dir, "videos", f"{name}.mp4")
    write_clip(video, moving_shape_frames(direction, spec, rng), spec.video_fps)
    return Question("video", QUESTIONS["video"], [f"a shape moving {d}" for d in options],
                    options.index(direction), {"video": rel})
