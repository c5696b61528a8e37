"""GRPO math in pure torch: group advantages, KL estimators, the policy loss and its aggregations.

No Ray, no DeepSpeed: every function here is checked against float64 formulas in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from learner.advantages import grpo as _grpo_advantages

KL_CLAMP = 10.0


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r − mean) / (std + eps) within consecutive blocks of ``group_size``; unbiased std."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (GRPO compares completions), got {group_size}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)  # unbiased, as the reference
    return ((grouped - mean) / (std + eps)).view(-1)


def group_advantages_by_id(rewards: torch.Tensor, group_ids: Sequence[object], eps: float = 1e-4) -> torch.Tensor:
    """The same normalisation with groups given by an id per completion (any order, any sizes ≥ 2);
    ``learner.advantages.grpo``, kept under this name for the callers that know it."""
    return _grpo_advantages(rewards, group_ids, eps)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log π − log π_ref (unbiased, can be negative)."""
    return logp - ref_logp


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """½ (log π − log π_ref)²."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(d) − d − 1 with d = clamp(log π_ref − log π, −10, 10): the reference run's estimator."""
    d = torch.clamp(ref_logp - logp, -KL_CLAMP, KL_CLAMP)
    return torch.exp(d) - d - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


@dataclass(frozen=True)
class LossNorm:
    """The whole optimizer step's counts, so that the loss of any part of the batch (a rank's
    micro-batch) is its exact share of the full-batch loss and the shares sum to it."""

    sequences: int
    tokens: float
    length: int  # Dr. GRPO's constant: the generation limit


def _seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / norm.sequences


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    return (per_token * mask).sum() / max(norm.tokens, 1.0)


def _seq_mean_token_sum(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    # each sequence's token sum, mean over sequences: longer completions weigh more (Dr. GRPO's
    # objective before its constant normaliser)
    return (per_token * mask).sum() / norm.sequences


def _seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    # Dr. GRPO: each sequence's token sum over a constant length, mean over sequences
    return (per_token * mask).sum() / norm.length / norm.sequences


AGGREGATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, LossNorm], torch.Tensor]] = {
    "seq-mean-token-mean": _seq_mean_token_mean,
    "token-mean": _token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def local_norm(mask: torch.Tensor) -> LossNorm:
    """The counts of this batch alone (the whole step is this batch)."""
    return LossNorm(sequences=mask.shape[0], tokens=float(mask.sum()), length=mask.shape[1])


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "seq-mean-token-mean",
    norm: LossNorm | None = None,
) -> torch.Tensor:
    try:
        fn = AGGREGATIONS[agg]
    except KeyError:
        raise ValueError(f"unknown aggregation {agg!r}; known: {sorted(AGGREGATIONS)}") from None
    mask = mask.to(per_token.dtype)
    return fn(per_token, mask, norm if norm is not None else local_norm(mask))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """π/π_old per token: the ratio of PPO and of the reference loss (which is 1 in value on
    policy, with the gradient of log π)."""
    return torch.exp(logp - old_logp)


def sequence_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's ratio in its per-token form: s_i = exp(mean over the sequence's tokens of
    log π − log π_old), the geometric mean of the token ratios, as the value of every token, with
    the gradient of that token's log π: sg(s_i) · π_t / sg(π_t). Aggregated by
    seq-mean-token-mean, its gradient is s_i · A_i · mean_t ∇log π_t (Zheng et al., 2025, "Group
    Sequence Policy Optimization")."""
    mask = mask.to(logp.dtype)
    mean_log = ((logp - old_logp) * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return torch.exp(mean_log).detach() * torch.exp(logp - logp.detach())


# name → (ratio, clipped): the reference loss has no clip; PPO clips each token's ratio with its
# own low/high bounds (DAPO's clip-higher, Yu et al. 2025); GSPO clips the sequence's ratio
POLICY_LOSSES: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], bool]] = {
    "reference": (token_ratio, False),
    "ppo_clip": (token_ratio, True),
    "gspo": (sequence_ratio, True),
}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip_eps: float | tuple[float, float] | None = None,
    agg: str = "seq-mean-token-mean",
    kl: str = "k3",
    is_weights: torch.Tensor | None = None,
    norm: LossNorm | None = None,
    loss: str | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss over completion tokens ([batch, tokens] tensors, ``advantages`` [batch]).

    ``loss`` (``POLICY_LOSSES``; default: "ppo_clip" with a ``clip_eps``, else "reference"):
    - reference: −(ratio·A − β·KL) per token with ``old_logp = logp.detach()``, the reference run's;
    - ppo_clip: −(min(ratio·A, clip(ratio, 1 − low, 1 + high)·A) − β·KL), ``clip_eps`` a float
      or a (low, high) pair;
    - gspo: the same clip on GSPO's sequence ratio (`sequence_ratio`).
    ``is_weights`` multiply the per-token policy term: the rollout correction (truncated importance
    weights, or 0 for masked tokens). ``norm`` gives the whole step's counts when this batch is
    one part of it (default: this batch is the step).
    """
    name = loss or ("ppo_clip" if clip_eps is not None else "reference")
    try:
        ratio_fn, clips = POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; known: {sorted(POLICY_LOSSES)}") from None
    if clips and clip_eps is None:
        raise ValueError(f"policy loss {name!r} needs a clip range (clip_eps)")
    if not clips and clip_eps is not None:
        raise ValueError(f"policy loss {name!r} has no clip; clip_eps={clip_eps} would do nothing")
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    ratio = ratio_fn(logp, old_logp, mask)
    surrogate = ratio * adv
    clipped_frac = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if clip_eps is not None:
        low, high = (clip_eps, clip_eps) if isinstance(clip_eps, float | int) else clip_eps
        clipped = torch.clamp(ratio, 1.0 - low, 1.0 + high) * adv
        surrogate = torch.minimum(surrogate, clipped)
        clipped_frac = masked_mean((clipped < ratio * adv).to(logp.dtype), mask)
    if is_weights is not None:
        surrogate = surrogate * is_weights.to(logp.dtype)
    per_token = -surrogate
    kl_value = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None and beta != 0.0:
        per_token_kl = KL_ESTIMATORS[kl](logp, ref_logp)
        per_token = per_token + beta * per_token_kl
        kl_value = masked_mean(per_token_kl.detach(), mask)
    loss_value = aggregate(per_token, mask, agg, norm)
    with torch.no_grad():
        valid = mask.bool()
        r = ratio.detach()[valid]
        metrics = {
            "kl": float(kl_value),
            "clip_fraction": float(clipped_frac),
            "ratio/mean": float(r.mean()) if r.numel() else 1.0,
            "ratio/max": float(r.max()) if r.numel() else 1.0,
            "ratio/min": float(r.min()) if r.numel() else 1.0,
        }
    return loss_value, metrics
