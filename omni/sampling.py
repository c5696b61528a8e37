"""The sampling distribution, defined once for both sides: what vLLM samples from and what the
learner compares vLLM's log-probs with.

vLLM (0.32, `vllm/v1/sample/sampler.py`, engines started with ``logprobs_mode="processed_logprobs"``,
see `rollout/engine.py`) samples the next token and reports its log-prob after these steps, in this
order, on float32 logits:

1. the logit bias (the engines give media placeholders ``SUPPRESS_BIAS``, so they are never sampled);
2. division by the temperature;
3. top-k: every logit below the k-th largest is masked to −inf (ties with it are kept);
4. top-p on the softmax of what top-k kept: sorted ascending, a token whose cumulative probability
   is at most 1 − p is masked to −inf, the largest always kept
   (`vllm/v1/sample/ops/topk_topp_sampler.py`, ``apply_top_k_top_p_pytorch``);
5. log-softmax over what is left.

Two views come out of this one definition:

- the *sampling* distribution, all five steps (:func:`sampling_token_logprobs`; the mask of steps
  3–4 is :func:`kept_tokens`): what vLLM's log-probs are compared with — the mismatch metrics, the
  importance weights and the off-policy ratio;
- the *tempered* distribution, the model's softmax at the temperature over the whole vocabulary
  (:func:`tempered_logits`, step 2 alone): what the loss uses — the policy gradient, the KL to the
  reference, the ratio between optimizer passes (`learner/worker.py` says why).

:func:`distribution_logprobs` gives either for chosen tokens. Pure torch, checked against a float64
reference and against vLLM's own masking function in `tests/test_sampling_cpu.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SUPPRESS_BIAS = -100.0  # vLLM logit_bias of the tokens an engine never samples (media placeholders)
# vLLM raises a smaller positive temperature to this (SamplingParams, _MAX_TEMP); the run config
# refuses less for training (orchestrator.config.MIN_TEMPERATURE, held equal by a test)
MIN_TEMPERATURE = 1e-2
POSITIONS_PER_SORT = 64  # positions truncated at a time: a few [64, V] tensors (top-p sorts each row)


def suppression_bias(token_ids: Iterable[int]) -> dict[int, float]:
    """vLLM's ``logit_bias`` for tokens that must never be sampled (the learner applies the same)."""
    return {int(t): SUPPRESS_BIAS for t in token_ids}


@dataclass(frozen=True)
class SamplingDistribution:
    """The distribution vLLM samples a token from: temperature, top-k, top-p, and the tokens the
    engines suppress with ``SUPPRESS_BIAS``. ``top_k`` −1 or 0 (or at least the vocabulary) and
    ``top_p`` 1 are off, as in vLLM. Temperature 0 (greedy decoding) is no distribution: refused."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    suppressed: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            raise ValueError(
                f"temperature {self.temperature}: a sampling distribution needs a temperature of at least "
                f"{MIN_TEMPERATURE} (0 is greedy decoding, whose tokens have no log-probability to compare)"
            )
        if self.top_k < -1:
            raise ValueError(f"top_k {self.top_k}: -1 or 0 (off) or at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p {self.top_p}: must lie in (0, 1]")

    def truncates(self, vocab_size: int) -> bool:
        """Whether top-k or top-p can mask a token of a ``vocab_size`` vocabulary."""
        return 0 < self.top_k < vocab_size or self.top_p < 1.0


def tempered_logits(logits: torch.Tensor, dist: SamplingDistribution) -> torch.Tensor:
    """float32 logits / T (differentiable): the tempered distribution's logits. Without a
    temperature, float32 logits come back as they are (no copy); nothing here writes them."""
    z = logits.float()
    return z / dist.temperature if dist.temperature != 1.0 else z


def kept_tokens(z: torch.Tensor, dist: SamplingDistribution) -> torch.Tensor | None:
    """bool [..., V]: the tokens that top-k and top-p keep of biased, tempered logits ``z`` (steps
    1–2); None when neither truncates (every token is kept). vLLM's rules: a top-k threshold keeps
    its ties; top-p sorts ascending and sums the same float32 probabilities in the same order (only
    a tie that straddles the top-p boundary may split otherwise). Top-p sorts the whole row: callers
    pass a few positions at a time (see :func:`sampling_token_logprobs`)."""
    vocab = z.shape[-1]
    if not dist.truncates(vocab):
        return None
    z = z.detach()
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < dist.top_k < vocab:
        keep = z >= z.topk(dist.top_k, dim=-1).values[..., -1:]
    if dist.top_p < 1.0:
        ascending, order = z.masked_fill(~keep, -math.inf).sort(dim=-1, descending=False)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - dist.top_p
        drop[..., -1] = False  # the most likely token always stays
        keep &= ~torch.zeros_like(drop).scatter_(-1, order, drop)
    return keep


def sampling_token_logprobs(
    z: torch.Tensor, targets: torch.Tensor, dist: SamplingDistribution, outside: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """log p(target) under the sampling distribution, from tempered logits ``z`` [..., V] (from
    :func:`tempered_logits`) and target ids [...] → [...] float32, without gradient. The bias
    goes on as ``SUPPRESS_BIAS / T``: vLLM adds it before dividing, which rounds a suppressed
    token's logit (about −100 / T, a probability below 1e-40) otherwise and leaves every other
    token's bit for bit. ``POSITIONS_PER_SORT`` positions at a time, so no second [..., V] tensor
    is made.

    A target that the truncation masks gets its log-prob in the kept set *with the target added*
    (renormalised over kept ∪ {target}), not −inf: the sampler drew it, so it lay in vLLM's kept
    set, and it can fall outside the learner's only by rounding at the boundary (bf16 logits on
    GPUs; ties) or because the policy moved since (one step off policy). The value stays close to
    vLLM's in the first case and small in the second, and is finite in both: no infinite mismatch
    metric, importance weight or ratio. ``outside`` (a list) gets the bool [...] tensor of such
    targets, to be counted (``mismatch/outside_support``).
    """
    vocab = z.shape[-1]
    flat_z, flat_t = z.detach().reshape(-1, vocab), targets.reshape(-1, 1)
    values = torch.empty(flat_t.shape[0], dtype=torch.float32, device=z.device)
    masked = torch.zeros(flat_t.shape[0], dtype=torch.bool, device=z.device)
    suppressed = list(dist.suppressed)
    for start in range(0, flat_z.shape[0], POSITIONS_PER_SORT):
        rows = slice(start, start + POSITIONS_PER_SORT)
        part, index = flat_z[rows].float(), flat_t[rows]
        if suppressed:
            part = part.clone()
            part[:, suppressed] += SUPPRESS_BIAS / dist.temperature
        keep = kept_tokens(part, dist)
        if keep is not None:
            masked[rows] = ~keep.gather(-1, index).squeeze(-1)
            part = part.masked_fill(~keep.scatter_(-1, index, True), -math.inf)
        values[rows] = part.gather(-1, index).squeeze(-1) - torch.logsumexp(part, dim=-1)
    if outside is not None:
        outside.append(masked.view(targets.shape))
    return values.view(targets.shape)


def distribution_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    dist: SamplingDistribution,
    *,
    truncated: bool = True,
    outside: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p(target) for [..., V] logits (any float dtype) and [...] target ids → [...] float32.
    ``truncated`` (default): under the sampling distribution ``dist`` (what vLLM reports; no
    gradient; masked targets and ``outside`` as in :func:`sampling_token_logprobs`);
    ``truncated=False``: under the tempered one (temperature only, differentiable: the loss's)."""
    z = tempered_logits(logits, dist)
    if truncated:
        return sampling_token_logprobs(z, targets, dist, outside)
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
