"""Evaluation protocols: the paper's two protocols render and decode as upstream's evaluation script
(HarryHsing/EchoInk@3f6d16a, src/omniInstruct-v1_eval_valid.py; its strings written out again here),
the fair one as training does; summary.json records the protocol and compare refuses mixing."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from avqa import load_records, prompt_text
from avqa.prompt import PROMPT_OVERRIDE, build_messages
from echoink.cli import main
from evaluation.evaluate import EvalSettings
from evaluation.protocols import BY_NAME, paper_choice
from evaluation.results import compare
from omni.inputs import load_processor, prepare_prompt
from orchestrator.config import ConfigError, load_config
from orchestrator.settings import eval_settings
from rollout.types import SamplingSettings

# upstream's strings, as its script has them
SYSTEM = "You are a helpful assistant."
BASE_TEMPLATE = "{Question}\nPlease answer the following question based on the given image and audio."
TRAINED_TEMPLATE = (
    "{Question}\n"
    "Please think about this question as if you were a human pondering deeply. "
    "Make sure to carefully consider both the visual and audio information before answering. "
    "Engage in an internal dialogue using expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', "
    "'let's break it down', etc, or other natural language thought expressions "
    "It's encouraged to include self-reflection or verification in the reasoning process. "
    "Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags."
)
TYPE_TEMPLATE = " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
MEDIA = "<|vision_bos|><|IMAGE|><|vision_eos|><|audio_bos|><|AUDIO|><|audio_eos|>"


def chat(system: str, user: str) -> str:
    """Qwen2.5-Omni's chat template for one system and one user turn, generation prompt added."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{MEDIA}{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def record(synth_dir: Path):
    return load_records(synth_dir / "valid" / "omni_rl_format_valid.json")[0]


def test_paper_prompts_render_as_upstream(record, tiny_checkpoint: Path) -> None:
    processor = load_processor(tiny_checkpoint)
    question = record.question  # the record's "problem"
    upstream_question = question + "\n" + "\n".join(record.options)
    base_text = BASE_TEMPLATE.format(Question=upstream_question) + TYPE_TEMPLATE
    trained_text = TRAINED_TEMPLATE.format(Question=upstream_question) + TYPE_TEMPLATE

    [base] = BY_NAME["paper-base"].prepare([record])
    messages = build_messages(base)
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": SYSTEM}]}
    assert [p["type"] for p in messages[1]["content"]] == ["image", "audio", "text"]
    assert messages[1]["content"][2]["text"] == base_text
    # the engine's own system prompt does not leak into a protocol that brings its own
    assert prepare_prompt(base, processor, system_prompt="Answer briefly.").text == chat(SYSTEM, base_text)

    [trained] = BY_NAME["paper-trained"].prepare([record])
    messages = build_messages(trained)
    assert len(messages) == 1 and messages[0]["content"][2]["text"] == trained_text  # no system turn
    assert prepare_prompt(trained, processor).text == chat(SYSTEM, trained_text)  # the template's default

    [fair] = BY_NAME["fair"].prepare([record])
    assert PROMPT_OVERRIDE not in fair.extra
    assert build_messages(fair)[0]["content"][2]["text"] == prompt_text(record)
    assert prepare_prompt(fair, processor, system_prompt="Answer briefly.").text == chat("Answer briefly.", prompt_text(record))
    training = question + " Options:\n" + "\n".join(record.options) + "\n" + TRAINED_TEMPLATE.removeprefix("{Question}\n")
    assert prompt_text(record) == training + TYPE_TEMPLATE  # upstream grpo.py's training prompt
    # a JSON field of the override's name is data, not a prompt
    forged = replace(record, extra={PROMPT_OVERRIDE: {"text": "x", "system_prompt": None}})
    assert build_messages(forged)[-1]["content"][2]["text"] == prompt_text(record)


def test_decoding_parameters_are_upstream_values() -> None:
    from rollout.engine import sampling_params

    base = EvalSettings(protocol="paper-base", sampling=SamplingSettings(seed=3))
    trained = EvalSettings(protocol="paper-trained", sampling=SamplingSettings(seed=3))
    # paper-base: thinker_do_sample=False, repetition_penalty=1.0, generate's thinker_max_new_tokens 1024
    assert base.decoding() == SamplingSettings(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=1024, seed=3)
    # paper-trained: do_sample=True, top_p=0.95, temperature=1, GenerationConfig's top_k 50, 1024 tokens
    assert trained.decoding() == SamplingSettings(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=1024, seed=3)
    assert base.completions() == trained.completions() == 1
    params = sampling_params(trained.decoding(), 1, 7, {})
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens, params.repetition_penalty) == (
        1.0, 0.95, 50, 1024, 1.0
    )
    greedy = sampling_params(base.decoding(), 1, 7, {})
    assert (greedy.temperature, greedy.max_tokens, greedy.repetition_penalty) == (0.0, 1024, 1.0)
    # fair: the run's (eval.mode, sampling.max_new_tokens), unchanged
    config = load_config(None, ["sampling.max_new_tokens=99"])
    assert eval_settings(config).decoding() == SamplingSettings(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=99, seed=0)
    with pytest.raises(ValueError, match="fixes its decoding"):
        eval_settings(config, protocol="paper-base", mode="sampled")
    with pytest.raises(ConfigError, match="eval.protocol paper-trained"):
        load_config(None, ["eval.protocol=paper-trained", "eval.mode=sampled"])


def upstream_extract_choice(reply: str) -> str:
    """Upstream's parser, written out again from its definition, on the whole decoded reply."""
    if "\nassistant" in reply:
        reply = reply.split("\nassistant", 1)[1].strip()
    m = re.search(r"<answer>\s*([A-D])\s*</answer>", reply, re.I) or re.search(r"\b([A-D])\b", reply, re.I)
    return m.group(1).upper() if m else "?"


@pytest.mark.parametrize(
    ("completion", "choice"),
    [
        ("<think>t</think><answer>C</answer>", "C"),
        ("<answer> b </answer>", "B"),
        ("<answer>C. drum</answer>", "C"),  # no single letter in the tags: the first standalone letter
        ("I think it is a drum", "A"),  # the article reads as A
        ("<answer>E</answer>", "?"),
        ("<answer>BC</answer>", "?"),
        ("", "?"),
        ("<answer>drum</answer> so <answer>D</answer>", "D"),  # the first tag holding one letter
    ],
)
def test_paper_parser(completion: str, choice: str) -> None:
    assert paper_choice(completion) == choice
    prompt = f"system\n{SYSTEM}\nuser\nWhat is it?\nA. a dog\nB. a cat\nPlease answer.\nassistant\n"
    assert upstream_extract_choice(prompt + completion) == choice


def test_paper_parser_equals_upstream_on_random_replies() -> None:
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", " ", "\n", "a", "B", "c", "D", "E", "x", "is", ".", "<think>"]
    prompt = f"system\n{SYSTEM}\nuser\nQ?\nA. one\nB. two\nPlease answer.\nassistant\n"
    for _ in range(3000):
        completion = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        assert paper_choice(completion) == upstream_extract_choice(prompt + completion), repr(completion)


def test_scores_under_each_protocol() -> None:
    text = "<think>drum</think><answer>C.</answer>"
    assert BY_NAME["paper-base"].score(text, "C", "exact") == ("C", 1.0)  # lenient: the standalone C
    # upstream's fallback reads the first standalone letter, here the article "a"
    assert BY_NAME["paper-trained"].score("<think>a drum</think><answer>C.</answer>", "C", "exact") == ("A", 0.0)
    assert BY_NAME["fair"].score(text, "C", "exact") == ("C.", 0.0)
    assert BY_NAME["fair"].score(text, "C", "letters") == ("", 0.0)
    assert BY_NAME["fair"].score("<answer>C</answer>", "C", "letters") == ("C", 1.0)


def _fake_eval(folder: Path, protocol: str | None, outcomes: list[int]) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "results.jsonl", "w") as fh:
        for i, right in enumerate(outcomes):
            fh.write(json.dumps({"id": f"q{i}", "condition": "none", "correct": float(right)}) + "\n")
    if protocol is not None:
        (folder / "summary.json").write_text(json.dumps({"protocol": {"name": protocol}}))
    return folder


def test_compare_refuses_mixed_protocols(tmp_path: Path, capsys) -> None:
    base = _fake_eval(tmp_path / "base", "paper-base", [1, 0, 0, 1])
    trained = _fake_eval(tmp_path / "trained", "paper-trained", [1, 1, 0, 1])
    fair = _fake_eval(tmp_path / "fair", "fair", [1, 1, 1, 1])
    old = _fake_eval(tmp_path / "old", None, [0, 0, 0, 0])  # before protocols: fair
    with pytest.raises(ValueError, match="protocol paper-base .* with paper-trained"):
        compare(base, trained)
    mixed = compare(base, trained, allow_mixed_protocols=True)
    assert (mixed["protocol_a"], mixed["protocol_b"], mixed["a_wrong_b_right"]) == ("paper-base", "paper-trained", 1)
    assert compare(old, fair)["protocol_a"] == "fair"
    assert main(["compare", str(base), str(trained)]) == 2
    assert "--allow-mixed-protocols" in capsys.readouterr().err
    assert main(["compare", str(base), str(trained), "--allow-mixed-protocols"]) == 0
    assert "(protocol paper-trained)" in capsys.readouterr().out
