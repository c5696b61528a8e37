"""Rollout correction in pure torch: the learner's probabilities π of the sampled tokens against the
sampler's (vLLM's) μ, which differ one step off policy and by the two engines' numerics.

Which correction is in force (:func:`resolve_correction`, the one ``auto`` rule, which the run
config validates with too), the sampler's log-probs lined up with a micro-batch's tokens
(:func:`sampler_logprobs`), the per-token weights of the policy term (:func:`rollout_weights`) and
the step's mismatch metrics (:func:`mismatch_parts`). No Ray, no DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learner.types import LearnerSettings


@dataclass(frozen=True)
class SamplerLogprobs:
    """The sampler's (vLLM's) log-probs of a micro-batch's completion tokens, [B, C] each."""

    logprobs: torch.Tensor  # float32; NaN where unknown
    known: torch.Tensor  # bool: a trained token (in the mask) with a finite sampler log-prob
    missing: torch.Tensor  # bool: a trained token of a completion that came with log-probs, lacking one


def resolve_correction(
    rollout_correction: str, off_policy: bool, clip_eps: float | tuple[float, float] | None
) -> str:
    """The correction in force: ``rollout_correction`` as given, or for ``auto`` truncated
    importance weights (``tis``) for a one-step-off sampler, unless a clipped loss (``clip_eps``
    set) already takes its ratio against the sampler; ``none`` on policy (the reference run)."""
    if rollout_correction == "auto":
        return "tis" if off_policy and clip_eps is None else "none"
    return rollout_correction


def sampler_logprobs(rows: Sequence[Sequence[float] | None], mask: torch.Tensor) -> SamplerLogprobs | None:
    """Line up each completion's sampler log-probs with its tokens; ``None`` when no completion
    carries any (batches built without a sampler: nothing to compare or to weight).

    A missing entry (a list shorter than the completion) or a non-finite one is unknown, never
    0, which would mean "the sampler was certain" and skew the mismatch metrics and the
    importance weights. Unknown tokens of a completion that came with log-probs are ``missing``
    (counted as ``mismatch/missing_logprobs``); a completion without any (``None``) is not
    counted: nothing was asked of a sampler for it.
    """
    if all(row is None for row in rows):
        return None
    if len(rows) != mask.shape[0]:
        raise ValueError(f"{len(rows)} rows of sampler log-probs for a batch of {mask.shape[0]} completions")
    values = torch.full(mask.shape, math.nan, dtype=torch.float32)
    given = torch.zeros(mask.shape[0], dtype=torch.bool)
    for i, row in enumerate(rows):
        if row is None:
            continue
        given[i] = True
        n = min(len(row), mask.shape[1])
        if n:
            values[i, :n] = torch.tensor(list(row[:n]), dtype=torch.float32)
    values = values.to(mask.device)
    finite = torch.isfinite(values)
    trained = mask > 0
    return SamplerLogprobs(
        logprobs=values,
        known=finite & trained,
        missing=~finite & trained & given.to(mask.device).unsqueeze(1),
    )


def rollout_weights(
    logp: torch.Tensor, sampled: SamplerLogprobs, mask: torch.Tensor, correction: str, s: LearnerSettings
) -> torch.Tensor | None:
    """Per-token weights of the policy term that correct for sampling with vLLM's probabilities μ
    instead of the learner's π (a one-step-off sampler, or the two engines' numerical gap); ``logp``
    is log π of the same distribution as μ (``omni.sampling``: temperature, top-k, top-p):

    - tis: min(π/μ, C), truncated importance sampling (Ionides 2008; Yao et al. 2025, "Your
      efficient RL framework secretly brings you off-policy RL training"), C = ``is_clip``;
    - token_mask: 1 where π/μ lies in [low, high], else 0 (the token leaves the loss);
    - seq_mask: 1 for a whole completion whose geometric-mean ratio exp(mean log π/μ) lies in
      [low, high], else 0.

    A token without a sampler log-prob is treated as on-policy: weight 1. Its weight π/μ is
    unknown, and 1 is that weight's expectation under the sampler (E_μ[π/μ] = 1): the token keeps
    its uncorrected gradient and its place in the loss's normalisation. (Reading log μ as 0 gave
    the weight π < 1, which shrank exactly the tokens that vLLM failed to report.)
    """
    if correction == "none":
        return None
    ones = torch.ones_like(logp)
    if correction == "tis":
        weights = torch.exp(logp - sampled.logprobs).clamp(max=s.is_clip)
        return torch.where(sampled.known, weights, ones) * mask
    log_r = torch.where(sampled.known, logp - sampled.logprobs, torch.zeros_like(logp))
    low, high = math.log(s.correction_low), math.log(s.correction_high)
    if correction == "token_mask":
        keep = (log_r >= low) & (log_r <= high)
    elif correction == "seq_mask":
        known = sampled.known.to(logp.dtype)
        mean = (log_r * known).sum(dim=1, keepdim=True) / known.sum(dim=1, keepdim=True).clamp(min=1)
        keep = ((mean >= low) & (mean <= high)).expand_as(log_r)
    else:
        raise ValueError(f"unknown rollout correction {correction!r}")
    return keep.to(logp.dtype) * mask


def mismatch_parts(
    logp: torch.Tensor,
    sampled: SamplerLogprobs,
    mask: torch.Tensor,
    is_weights: torch.Tensor | None,
    outside: torch.Tensor | None = None,
) -> dict[str, float]:
    """One micro-batch's sums for the ``mismatch/*`` and ``rollout_correction/*`` metrics (and
    the helper counts they are divided by, see ``learner.group.combine``), over the trained tokens
    that have a sampler log-prob; ``logp`` is the learner's, detached, of the same distribution as
    the sampler's (``omni.sampling``: temperature, top-k, top-p). ``outside`` marks the tokens that
    the learner's top-k / top-p masks (counted as ``mismatch/outside_support``)."""
    zero = torch.zeros_like(logp)
    prob_gap = torch.where(sampled.known, (torch.exp(logp) - torch.exp(sampled.logprobs)).abs(), zero)
    logp_gap = torch.where(sampled.known, (logp - sampled.logprobs).abs(), zero)
    # the learner against the sampler on the sampled tokens: KL(μ‖π) by k3 (r − 1 − log r,
    # r = π/μ) and the log-perplexity gap (mean log μ − mean log π)
    log_r = torch.where(sampled.known, logp - sampled.logprobs, zero)
    parts = {
        "mismatch/token_prob_error": float(prob_gap.sum()),
        "mismatch/logprob_abs_error": float(logp_gap.sum()),
        "mismatch/missing_logprobs": float(sampled.missing.sum()),
        "_sampled_tokens": float(sampled.known.sum()),
        "rollout_correction/kl": float(torch.where(sampled.known, log_r.exp() - 1 - log_r, zero).sum()),
        "rollout_correction/log_ppl_diff": float(-log_r.sum()),
    }
    if outside is not None:
        parts["mismatch/outside_support"] = float((outside & sampled.known).sum())
    if is_weights is not None:
        w = torch.where(mask > 0, is_weights, zero)
        parts["rollout_correction/masked_share"] = float(((w == 0) & (mask > 0)).sum())
        parts["_weight_sum"] = float(w.sum())
        parts["_weight_sq_sum"] = float((w**2).sum())
    return parts
