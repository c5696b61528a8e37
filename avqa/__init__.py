"""The task: AVQA-R1-6K records, their media, the EchoInk prompt and a synthetic question set."""

from avqa.errors import MediaError, RecordError
from avqa.loader import LoadReport, load_records
from avqa.media import (
    MAX_AUDIO_SECONDS,
    MAX_PIXELS,
    MIN_PIXELS,
    SAMPLE_RATE,
    load_audio,
    load_image,
    prepare_image,
    smart_resize,
)
from avqa.prompt import REASONING_INSTRUCTION, build_messages, prompt_text, question_text
from avqa.record import Record, parse_answer_letters

__all__ = [
    "MAX_AUDIO_SECONDS",
    "MAX_PIXELS",
    "MIN_PIXELS",
    "REASONING_INSTRUCTION",
    "SAMPLE_RATE",
    "LoadReport",
    "MediaError",
    "Record",
    "RecordError",
    "build_messages",
    "load_audio",
    "load_image",
    "load_records",
    "parse_answer_letters",
    "prepare_image",
    "prompt_text",
    "question_text",
    "smart_resize",
]
