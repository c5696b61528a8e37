"""Evaluation protocols: how a checkpoint is asked (system message, user text, decoding, token limit)
and how its answer is read.

- ``fair`` (the default): the training prompt and system prompt, ``eval.mode`` decoding with
  ``sampling.max_new_tokens``, and the reward's own answer parsing (``rewards.accuracy_match``).
  One protocol for the model before and after training, so a difference is the training's.
- ``paper-base`` and ``paper-trained``: the two protocols behind the EchoInk-R1 paper's numbers
  (80.53 % before, 85.77 % after), as its public evaluation script runs them. Their strings and
  settings are facts taken from that script (HarryHsing/EchoInk at 3f6d16a,
  ``src/omniInstruct-v1_eval_valid.py``) and from transformers' Qwen2.5-Omni ``generate``; this
  module writes them down, it does not copy that code.

The protocols' prompts reach the engines as :class:`avqa.prompt.PromptOverride` on the records,
so they go through the same `omni.inputs.prepare_prompt`, processor and vLLM engine as training.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from avqa import REASONING_INSTRUCTION, Record
from avqa.prompt import PromptOverride, with_prompt
from evaluation.stats import prediction
from rewards import AccuracyMatch, accuracy_reward, extract_answer
from rollout.types import SamplingSettings

PROTOCOLS: tuple[str, ...] = ("fair", "paper-base", "paper-trained")
UPSTREAM_EVAL = "HarryHsing/EchoInk@3f6d16a src/omniInstruct-v1_eval_valid.py"

# --- the upstream evaluation script's strings (src/omniInstruct-v1_eval_valid.py) -------------
# base model (BASE_MODEL = True): an explicit system message and a direct-answer instruction
PAPER_SYSTEM_PROMPT = "You are a helpful assistant."
PAPER_BASE_INSTRUCTION = "Please answer the following question based on the given image and audio."
# TYPE_TEMPLATE["multiple choice"], appended to both protocols' text (its leading space included)
PAPER_LETTER_INSTRUCTION = (
    " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags."
)
# trained model: no system message, the training instruction (QUESTION_TEMPLATE + TYPE_TEMPLATE),
# which is avqa.REASONING_INSTRUCTION word for word; the question and options are joined by a
# newline instead of the training prompt's " Options:\n"

# --- decoding --------------------------------------------------------------------------------
# Both protocols call Qwen2_5OmniForConditionalGeneration.generate without a token limit, so the
# thinker gets generate's own thinker_max_new_tokens=1024 (transformers 4.52.0,
# models/qwen2_5_omni/modeling_qwen2_5_omni.py:4418 and :4463-4465).
PAPER_MAX_NEW_TOKENS = 1024
# paper-trained samples with do_sample=True, top_p=0.95, temperature=1 and no top_k, so
# GenerationConfig's default top_k=50 applies (transformers 4.52.0,
# generation/configuration_utils.py:431). paper-base: thinker_do_sample=False (greedy),
# repetition_penalty=1.0 (no penalty: vLLM's default).
PAPER_TEMPERATURE = 1.0
PAPER_TOP_P = 0.95
PAPER_TOP_K = 50

# --- the upstream parser (extract_choice): the first <answer> holding one letter A-D, any case;
# else the first standalone letter A-D anywhere in the reply, any case (so the article "a" reads
# as A); else no answer. Upstream reads the decoded reply after its first "\nassistant", which is
# the generation prompt's: the completion, stripped. Both searches are linear in the text.
PAPER_ANSWER_RE = re.compile(r"<answer>\s*([A-D])\s*</answer>", re.IGNORECASE)
PAPER_LETTER_RE = re.compile(r"\b([A-D])\b", re.IGNORECASE)
NO_CHOICE = "?"


def paper_choice(text: str) -> str:
    """The option letter upstream's evaluation reads from a completion ("?" when none)."""
    match = PAPER_ANSWER_RE.search(text) or PAPER_LETTER_RE.search(text)
    return match.group(1).upper() if match else NO_CHOICE


def paper_question(record: Record) -> str:
    """The evaluation script's question: the problem, a newline, the options one per line."""
    return record.question + "\n" + "\n".join(record.options)


def paper_base_text(record: Record) -> str:
    return paper_question(record) + "\n" + PAPER_BASE_INSTRUCTION + PAPER_LETTER_INSTRUCTION


def paper_trained_text(record: Record) -> str:
    return paper_question(record) + "\n" + REASONING_INSTRUCTION


@dataclass(frozen=True)
class Decoding:
    """A protocol's fixed decoding (the fair protocol's comes from the run config)."""

    greedy: bool
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int

    def sampling(self, seed: int | None) -> SamplingSettings:
        if self.greedy:
            return SamplingSettings(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=self.max_new_tokens, seed=seed)
        return SamplingSettings(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens, seed=seed
        )


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    parser: Literal["reward", "paper"]
    decoding: Decoding | None = None  # None: the run's (eval.mode, sampling.*)
    system_prompt: str | None = None  # own_prompt only; None: no system turn
    own_prompt: bool = False  # False: the training prompt with the run's system_prompt
    source: str = ""

    def user_text(self, record: Record) -> str | None:
        """The protocol's user text for ``record`` (None: the training prompt's)."""
        if self.name == "paper-base":
            return paper_base_text(record)
        if self.name == "paper-trained":
            return paper_trained_text(record)
        return None

    def prepare(self, records: Sequence[Record]) -> list[Record]:
        """The records as the engines should see them: with this protocol's prompt attached."""
        if not self.own_prompt:
            return list(records)
        return [with_prompt(r, PromptOverride(self.user_text(r) or "", self.system_prompt)) for r in records]

    def score(self, text: str, gold: str, match: AccuracyMatch) -> tuple[str, float]:
        """(prediction, correct) of one completion under this protocol's parser."""
        if self.parser == "paper":
            choice = paper_choice(text)
            return choice, 1.0 if choice == gold.strip() else 0.0
        correct = accuracy_reward(text, gold, match=match)
        return _reward_prediction(text, match), correct

    def record_of(self, sampling: SamplingSettings, samples: int, match: AccuracyMatch) -> dict[str, Any]:
        """What summary.json says about the protocol that produced it."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "parser": "paper (upstream extract_choice)" if self.parser == "paper" else f"reward ({match})",
            "decoding": {**asdict(sampling), "samples": samples},
            "source": self.source,
        }
        if self.own_prompt:
            out["system_prompt"] = self.system_prompt
        return out


def _reward_prediction(text: str, match: AccuracyMatch) -> str:
    if match == "exact":
        return extract_answer(text) or ""
    return prediction(text)


FAIR = Protocol(
    name="fair",
    description="the training prompt and system prompt, eval.mode decoding with sampling.max_new_tokens, "
    "the reward's answer parsing: one protocol before and after training",
    parser="reward",
)
PAPER_BASE = Protocol(
    name="paper-base",
    description="the paper's base-model protocol (80.53 %): explicit system message, direct-answer prompt, "
    "greedy, 1024 new tokens, upstream's lenient parser",
    parser="paper",
    decoding=Decoding(greedy=True, temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=PAPER_MAX_NEW_TOKENS),
    system_prompt=PAPER_SYSTEM_PROMPT,
    own_prompt=True,
    source=UPSTREAM_EVAL + " (BASE_MODEL = True)",
)
PAPER_TRAINED = Protocol(
    name="paper-trained",
    description="the paper's trained-model protocol (85.77 %): the training instruction without a system "
    "message, one sample at temperature 1, top-p 0.95, top-k 50, 1024 new tokens, upstream's lenient parser",
    parser="paper",
    decoding=Decoding(
        greedy=False, temperature=PAPER_TEMPERATURE, top_p=PAPER_TOP_P, top_k=PAPER_TOP_K, max_new_tokens=PAPER_MAX_NEW_TOKENS
    ),
    system_prompt=None,
    own_prompt=True,
    source=UPSTREAM_EVAL + " (BASE_MODEL = False)",
)
BY_NAME: dict[str, Protocol] = {p.name: p for p in (FAIR, PAPER_BASE, PAPER_TRAINED)}


def get_protocol(name: str) -> Protocol:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown evaluation protocol {name!r}; choose from {', '.join(PROTOCOLS)}") from None


def with_token_limit(protocol: Protocol, max_new_tokens: int) -> Protocol:
    """The protocol with another token limit (a rehearsal's shortcut; summary.json records it)."""
    if protocol.decoding is None:
        return protocol
    return replace(protocol, decoding=replace(protocol.decoding, max_new_tokens=max_new_tokens))
