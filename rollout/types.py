"""What rollout produces and takes: completions, per-question results, engine and sampling settings."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from omni.inputs import MediaSettings
from omni.sampling import SamplingDistribution


@dataclass
class Completion:
    """One sampled answer: its text, tokens and the sampler's log-prob of each token."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per token; NaN where vLLM gave none (never read as 0)
    finish_reason: str  # "stop" (end of turn), "length" (token limit), "abort"


@dataclass
class RolloutResult:
    """The G completions of one question, with the prompt tokens vLLM used, or the error that
    failed this question alone (for example a broken media file)."""

    record_id: str
    prompt_token_ids: list[int] = field(default_factory=list)
    completions: list[Completion] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = -1
    max_new_tokens: int = 768
    seed: int | None = None  # per-request seeds are derived from it and the question
    ignore_eos: bool = False  # benchmarks: every completion runs to the token limit

    def distribution(self, suppressed: Iterable[int] = ()) -> SamplingDistribution:
        """What an engine samples from with these settings (its log-probs are of it), ``suppressed``
        the tokens it biases away (the media placeholders): the learner's side of a comparison.
        Greedy decoding (temperature 0) is no distribution and raises."""
        return SamplingDistribution(self.temperature, self.top_k, self.top_p, tuple(suppressed))


@dataclass(frozen=True)
class EngineSettings:
    model_path: Path
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    memory_share: float = 0.85
    kv_cache_bytes: int | None = None  # fixed KV cache size (CPU default: 256 MiB)
    enforce_eager: bool = False
    max_num_seqs: int = 256
    seed: int = 0
    dtype: str = "auto"
    load_format: str = "auto"  # "dummy": random weights from config.json (benchmarks)
    media: MediaSettings = MediaSettings()
    # (medium, most per prompt): vLLM's limit_mm_per_prompt; a medium left out is allowed none
    media_per_prompt: tuple[tuple[str, int], ...] = (("audio", 1), ("image", 1), ("video", 1))
    system_prompt: str | None = None
    sleep_mode: bool = False  # colocated on a GPU: vLLM frees its GPU memory while the learner trains
