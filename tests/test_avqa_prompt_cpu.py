"""The training prompt, byte for byte, and its chat messages."""

from __future__ import annotations

from pathlib import Path

from avqa import Record, build_messages, prompt_text

EXPECTED = (
    "Which instrument is playing? Options:\nA. Piano\nB. Violin\nC. Drum\nD. Flute\n"
    "Please think about this question as if you were a human pondering deeply. Make sure to carefully "
    "consider both the visual and audio information before answering. Engage in an internal dialogue "
    "using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, "
    "or other natural language thought expressions It's encouraged to include self-reflection or "
    "verification in the reasoning process. Provide your detailed reasoning between the <think> </think> "
    "tags, and then give your final answer between the <answer> </answer> tags. Please provide only the "
    "single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
)


def record() -> Record:
    return Record(
        id="7",
        question="Which instrument is playing?",
        options=("A. Piano", "B. Violin", "C. Drum", "D. Flute"),
        answer="C",
        image_path=Path("/data/images/7.jpg"),
        audio_path=Path("/data/audios/7.wav"),
    )


def test_prompt_text_byte_for_byte() -> None:
    text = prompt_text(record())
    assert text == EXPECTED
    assert text.encode("utf-8") == EXPECTED.encode("utf-8")
    assert "thought expressions It's" in text  # the original's missing period


def test_messages_hold_image_then_audio_then_text() -> None:
    messages = build_messages(record())
    assert len(messages) == 1 and messages[0]["role"] == "user"
    content = messages[0]["content"]
    assert [c["type"] for c in content] == ["image", "audio", "text"]
    assert content[0]["image"] == "/data/images/7.jpg" and content[1]["audio"] == "/data/audios/7.wav"
    assert content[2]["text"] == EXPECTED
    with_system = build_messages(record(), system_prompt="You are helpful.", image="IMG", audio="AUD")
    assert with_system[0] == {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]}
    assert with_system[1]["content"][0]["image"] == "IMG" and with_system[1]["content"][1]["audio"] == "AUD"
