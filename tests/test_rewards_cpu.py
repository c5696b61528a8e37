"""Format and accuracy rewards against the reference patterns, and the weighted registry."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from avqa import Record
from rewards import RewardSet, accuracy_reward, extract_answer, format_reward, register_reward
from rewards.functions import ANSWER_RE

REFERENCE_FORMAT = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)


def record(answer: str = "C") -> Record:
    return Record(
        id="1",
        question="q",
        options=("A. a", "B. b", "C. c", "D. d"),
        answer=answer,
        image_path=Path("/i.jpg"),
        audio_path=Path("/a.wav"),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>hmm</think><answer>C</answer>", 1.0),
        ("  \n<think>a\nb</think>\n\n<answer>C</answer>\n ", 1.0),
        ("<think>hmm</think> <answer>C</answer> trailing", 0.0),
        ("<think></think><answer>C</answer>", 0.0),
        ("<think>x</think><answer></answer>", 0.0),
        ("<think>x<think>y</think><answer>C</answer>", 0.0),
        ("<think>x</think><answer>C</answer><answer>D</answer>", 0.0),
        # no DOTALL: a second <think> on another line escapes the look-ahead, as in the reference
        ("<think>x\n<think>y</think><answer>C</answer>", 1.0),
        ("<answer>C</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward_cases(text: str, expected: float) -> None:
    assert format_reward(text) == expected
    assert (1.0 if REFERENCE_FORMAT.fullmatch(text.strip()) else 0.0) == expected


@pytest.mark.parametrize(
    ("text", "gold", "exact", "lenient"),
    [
        ("<think>t</think><answer>C</answer>", "C", 1.0, 1.0),
        ("<answer> C </answer>", "C", 1.0, 1.0),
        ("<answer>C. Drum</answer>", "C", 0.0, 1.0),
        ("<answer>C) drum</answer>", "C", 0.0, 1.0),
        ("<answer>C drum</answer>", "C", 0.0, 1.0),
        ("<answer>Drum</answer>", "C", 0.0, 0.0),
        ("<answer>c</answer>", "C", 0.0, 0.0),
        ("<answer>B</answer><answer>C</answer>", "C", 0.0, 0.0),  # the first answer counts
        ("<answer>A,C</answer>", "A,C", 1.0, 1.0),
        ("<answer>CA</answer>", "A,C", 1.0, 1.0),
        ("<answer>A</answer>", "AC", 0.0, 0.0),
        ("no tags C", "C", 0.0, 0.0),
        ("<answer>C", "C", 0.0, 0.0),
    ],
)
def test_accuracy_reward_cases(text: str, gold: str, exact: float, lenient: float) -> None:
    assert accuracy_reward(text, gold) == exact
    assert accuracy_reward(text, gold, lenient=True) == lenient


def test_extract_answer_equals_the_reference_regex_on_random_text() -> None:
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<think>", "</think>", " ", "\n", "A", "B", "x", "\t", "<", ">"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        match = ANSWER_RE.search(text)
        assert extract_answer(text) == (match.group(1).strip() if match else None), repr(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\x00\xff\ud800",
        b"\xff\xfe\x00binary",
        "<answer>" * 50_000,
        "<think>" * 50_000 + "</think>",
        "<think>" + "a" * 300_000 + "</think><answer>C</answer>",
        None,
        12345,
    ],
)
def test_rewards_never_raise(text) -> None:
    rewards = RewardSet()
    result = rewards.score(text, record())
    assert set(result.components) == {"accuracy", "format"}
    assert result.total == sum(result.components.values()) and not result.errors


def test_tag_reward_counts_tags() -> None:
    from rewards import tag_reward

    assert tag_reward("<think>a</think><answer>B</answer>") == 1.0
    assert tag_reward("hmm <answer>") == 0.25 and tag_reward("") == 0.0 and tag_reward(None) == 0.0


def test_weights_total_and_user_rewards() -> None:
    rewards = RewardSet(weights={"accuracy": 2.0, "format": 0.5})
    result = rewards.score("<think>t</think><answer>C</answer>", record())
    assert result.components == {"accuracy": 1.0, "format": 1.0} and result.total == 2.5
    wrong = rewards.score("<think>t</think><answer>B</answer>", record())
    assert wrong.total == 0.5

    @register_reward("test_length")
    def length(text, rec, options):
        if "boom" in text:
            raise RuntimeError("user bug")
        return len(text) / 10

    custom = RewardSet(weights={"test_length": 1.0, "format": 1.0})
    assert custom.score("x" * 20, record()).total == 2.0
    failed = custom.score("boom", record())
    assert failed.components["test_length"] == 0.0 and "user bug" in failed.errors["test_length"]
    with pytest.raises(ValueError, match="unknown reward"):
        RewardSet(weights={"nope": 1.0})
    lenient = RewardSet(options={"lenient": True})
    assert lenient.score("<answer>C. c</answer>", record()).components["accuracy"] == 1.0
