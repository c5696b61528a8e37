"""The task: AVQA-R1-6K records, their media (audio, image, video), the EchoInk prompt and a synthetic
question set."""

from avqa.errors import MediaError, RecordError
from avqa.loader import LoadReport, load_records
from avqa.media import (
    MAX_AUDIO_SECONDS,
    MAX_PIXELS,
    MAX_VIDEO_FRAMES,
    MIN_PIXELS,
    SAMPLE_RATE,
    VIDEO_FPS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    Video,
    load_audio,
    load_image,
    load_video,
    prepare_image,
    prepare_video,
    smart_resize,
)
from avqa.prompt import REASONING_INSTRUCTION, build_messages, prompt_text, question_text
from avqa.record import DATA_TYPES, MEDIA_FILES, MODALITIES, Record, parse_answer_letters

__all__ = [
    "DATA_TYPES",
    "MEDIA_FILES",
    "MODALITIES",
    "MAX_AUDIO_SECONDS",
    "MAX_PIXELS",
    "MAX_VIDEO_FRAMES",
    "MIN_PIXELS",
    "REASONING_INSTRUCTION",
    "SAMPLE_RATE",
    "VIDEO_FPS",
    "VIDEO_MAX_PIXELS",
    "VIDEO_MIN_PIXELS",
    "LoadReport",
    "MediaError",
    "Record",
    "RecordError",
    "Video",
    "build_messages",
    "load_audio",
    "load_image",
    "load_records",
    "load_video",
    "parse_answer_letters",
    "prepare_image",
    "prepare_video",
    "prompt_text",
    "question_text",
    "smart_resize",
]
