"""The EchoInk training prompt, word for word, and the Qwen2.5-Omni chat messages that carry it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from avqa.record import MEDIA_FILES, Record

# The reference wording. The missing period after "thought expressions" is in the original.
REASONING_INSTRUCTION = (
    "Please think about this question as if you were a human pondering deeply. "
    "Make sure to carefully consider both the visual and audio information before answering. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', "
    "'oh, I see', 'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final "
    "answer between the <answer> </answer> tags. Please provide only the single option letter "
    "(e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
)


def question_text(record: Record) -> str:
    return record.question + " Options:\n" + "\n".join(record.options)


def prompt_text(record: Record) -> str:
    """The text part of the user turn."""
    return question_text(record) + "\n" + REASONING_INSTRUCTION


@dataclass(frozen=True)
class PromptOverride:
    """Another prompt for one record: an evaluation protocol's user text and system message.

    Carried in ``Record.extra[PROMPT_OVERRIDE]`` (see :func:`with_prompt`), so that a protocol's
    records go through the same engines, `omni.inputs.prepare_prompt` and this module as training
    records do. ``system_prompt`` None: no system turn (the chat template's default applies). Only
    an instance of this class counts: a JSON field of that name in a dataset file changes nothing.
    """

    text: str
    system_prompt: str | None = None


PROMPT_OVERRIDE = "prompt_override"  # the Record.extra key of a PromptOverride


def with_prompt(record: Record, override: PromptOverride) -> Record:
    """A copy of ``record`` whose messages carry ``override`` instead of the training prompt."""
    return dataclasses.replace(record, extra={**record.extra, PROMPT_OVERRIDE: override})


def prompt_override(record: Record) -> PromptOverride | None:
    value = record.extra.get(PROMPT_OVERRIDE)
    return value if isinstance(value, PromptOverride) else None


def build_messages(
    record: Record,
    *,
    image: Any = None,
    audio: Any = None,
    video: Any = None,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """One user turn: the media the record's data_type reads, then the text. The reference order
    for image_audio is image, audio, text; a video comes first. A video_audio record's sound is
    its video's own track: the message holds the video only, and the processor's
    ``use_audio_in_video`` places the sound's tokens inside the video's (see `omni.inputs`).

    The media default to the record's file paths; pass loaded media to carry them in the message.
    A processor's chat template renders the placeholders either way. The text is the training
    prompt (the reference wording for every type), unless the record carries a
    :class:`PromptOverride` (an evaluation protocol's), whose text and system message then
    replace it and ``system_prompt``.
    """
    text = prompt_text(record)
    override = prompt_override(record)
    if override is not None:
        text, system_prompt = override.text, override.system_prompt
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    given = {"image": image, "audio": audio, "video": video}
    content: list[dict[str, Any]] = []
    for name in ("video", "image", "audio"):
        if name not in MEDIA_FILES[record.data_type]:  # video_audio's sound is inside its video
            continue
        value = given[name]
        content.append({"type": name, name: str(record.media_path(name)) if value is None else value})
    content.append({"type": "text", "text": text})
    messages.append({"role": "user", "content": content})
    return messages
