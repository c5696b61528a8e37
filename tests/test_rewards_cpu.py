"""Format and accuracy rewards against the reference patterns (EchoInk's grpo.py), in linear time on
any length, and the weighted registry."""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest

from avqa import Record
from orchestrator.config import ConfigError, RunConfig, load_config
from rewards import (
    DEFAULT_ACCURACY_MATCH,
    RewardSet,
    accuracy_reward,
    extract_answer,
    format_reward,
    register_reward,
)

REFERENCE_FORMAT = re.compile(
    r"^(?!.*<think>.*<think>)(?!.*<answer>.*<answer>)<think>[\s\S]+?</think>\s*<answer>[\s\S]+?</answer>$"
)
# the reference's answer pattern, written out here from EchoInk's grpo.py: an oracle the module under
# test cannot change
ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)


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
    ("text", "gold", "exact", "letters", "lenient"),
    [
        ("<think>t</think><answer>C</answer>", "C", 1.0, 1.0, 1.0),
        ("<answer> C </answer>", "C", 1.0, 1.0, 1.0),
        ("<answer>\nC\n</answer>", "C", 1.0, 1.0, 1.0),
        ("<answer>C. Drum</answer>", "C", 0.0, 0.0, 1.0),
        ("<answer>C) drum</answer>", "C", 0.0, 0.0, 1.0),
        ("<answer>C drum</answer>", "C", 0.0, 0.0, 1.0),
        ("<answer>Drum</answer>", "C", 0.0, 0.0, 0.0),
        ("<answer>c</answer>", "C", 0.0, 0.0, 0.0),
        ("<answer>B</answer><answer>C</answer>", "C", 0.0, 0.0, 0.0),  # the first answer counts
        ("<answer>A,C</answer>", "A,C", 1.0, 1.0, 1.0),
        ("<answer>CA</answer>", "A,C", 0.0, 1.0, 1.0),
        ("<answer>A</answer>", "AC", 0.0, 0.0, 0.0),
        ("no tags C", "C", 0.0, 0.0, 0.0),
        ("<answer>C", "C", 0.0, 0.0, 0.0),
        ("<answer></answer>", "C", 0.0, 0.0, 0.0),
        # the parity cases (issue 17): letter sets accept them, the reference's exact match does not
        ("<think>t</think><answer>C C</answer>", "C", 0.0, 1.0, 1.0),
        ("<think>t</think><answer>CC</answer>", "C", 0.0, 1.0, 1.0),
        ("<think>t</think><answer>C;</answer>", "C", 0.0, 1.0, 1.0),
        ("<think>t</think><answer>C, A</answer>", "A,C", 0.0, 1.0, 1.0),
    ],
)
def test_accuracy_reward_cases(text: str, gold: str, exact: float, letters: float, lenient: float) -> None:
    assert accuracy_reward(text, gold, match="exact") == exact
    assert accuracy_reward(text, gold, match="letters") == letters
    assert accuracy_reward(text, gold) == letters  # the default: the run config's
    assert accuracy_reward(text, gold, lenient=True) == lenient
    assert upstream_accuracy(text, f"<answer>{gold}</answer>") == exact
    assert RewardSet(options={"accuracy_match": "exact"}).score(text, record(gold)).components["accuracy"] == exact


def upstream_accuracy(completion: str, solution: str) -> float:
    """The reference's multiple-choice accuracy, written out again from its definition (EchoInk,
    src/r1-v/src/open_r1/grpo.py): the stripped first answer of each, compared as strings."""
    def first_answer(text: str) -> str:
        match = ANSWER_RE.search(text)
        return match.group(1).strip() if match else ""

    return 1.0 if first_answer(completion) == first_answer(solution) else 0.0


def test_exact_accuracy_equals_the_reference_on_random_text() -> None:
    rng = random.Random(1)
    pieces = ["<answer>", "</answer>", " ", "\n", "A", "C", ",", ";", "c", "x", "<think>", "</think>"]
    for _ in range(4000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        gold = rng.choice(["A", "C", "A,C"])
        assert accuracy_reward(text, gold, match="exact") == upstream_accuracy(text, f"<answer>{gold}</answer>"), (
            repr(text),
            gold,
        )


def test_format_reward_equals_the_reference_regex_on_random_text() -> None:
    rng = random.Random(2)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "\u00a0", "\r", "x", "C", "<", ">"]
    seen = 0
    for _ in range(6000):
        # mostly well-formed skeletons with noise, so that both outcomes are common
        body = [rng.choice(pieces) for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.6:
            body = ["<think>", *body[:3], "</think>", *body[3:5], "<answer>", *body[5:], "</answer>"]
        text = "".join(body)
        expected = 1.0 if REFERENCE_FORMAT.fullmatch(text.strip()) else 0.0
        assert format_reward(text) == expected, repr(text)
        seen += expected == 1.0
    assert 100 < seen < 5900  # both outcomes were exercised


def test_long_completions_are_scored_whole_in_linear_time() -> None:
    # a long reasoning is read to its end (a cut at 200,000 characters scored this 0 and 0)
    long = "<think>" + "a" * 300_000 + "</think><answer>C</answer>"
    result = RewardSet(options={"accuracy_match": "exact"}).score(long, record("C"))
    assert result.components == {"accuracy": 1.0, "format": 1.0}
    # inputs on which the reference's regexes backtrack: every </think> is a candidate whose answer
    # never closes at the end (format), and many openings without a closing tag (answer)
    def no_close(n: int) -> str:
        return "<think>a" + "</think>\n<answer>b\n" * n + "</answer> tail"

    def many_openings(n: int) -> str:
        return "<think>x</think>" + "<answer>" * n

    for small in (no_close(30), many_openings(30), no_close(30) + "</answer>"):
        assert format_reward(small) == (1.0 if REFERENCE_FORMAT.fullmatch(small.strip()) else 0.0)
    rewards = RewardSet(weights={"accuracy": 1.0, "format": 1.0, "tags": 1.0})
    for text in (no_close(120_000), many_openings(400_000), no_close(120_000) + "</answer>"):
        assert len(text) > 2_000_000
        started = time.perf_counter()
        scored = rewards.score(text, record())
        assert time.perf_counter() - started < 2.0, "rewards must stay linear in the completion's length"
        assert not scored.errors
    assert format_reward(no_close(120_000) + "</answer>") == 1.0 and format_reward(no_close(120_000)) == 0.0


def test_accuracy_match_options_are_checked() -> None:
    with pytest.raises(ValueError, match="accuracy_match 'fuzzy'"):
        RewardSet(options={"accuracy_match": "fuzzy"})
    with pytest.raises(ValueError, match="lenient"):
        RewardSet(options={"accuracy_match": "exact", "lenient": True})
    with pytest.raises(ValueError, match="lenient"):
        accuracy_reward("<answer>C</answer>", "C", match="exact", lenient=True)
    # the reward's default when a run passes no accuracy_match is the run config's default
    assert RunConfig().rewards.accuracy_match == DEFAULT_ACCURACY_MATCH
    assert load_config(Path(__file__).resolve().parent.parent / "configs" / "echoink_r1_7b.yaml").rewards.accuracy_match == "exact"
    with pytest.raises(ConfigError, match="rewards.lenient"):
        load_config(None, ["rewards.accuracy_match=exact", "rewards.lenient=true"])


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
