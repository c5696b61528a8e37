"""Advantage estimators, chosen by name (``grpo.advantage``): rewards of a step's completions and
the question id of each → one advantage per completion. Pure torch; a group is a question id.

Each works in float64 and returns the rewards' dtype. ``eps`` keeps a division finite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _groups(rewards: torch.Tensor, group_ids: Sequence[object]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's group code and each group's size; groups of fewer than 2 are refused
    (no completion to compare with)."""
    if len(group_ids) != rewards.numel():
        raise ValueError(f"{rewards.numel()} rewards but {len(group_ids)} group ids")
    index: dict[object, int] = {}
    codes = torch.tensor([index.setdefault(g, len(index)) for g in group_ids], device=rewards.device)
    counts = torch.bincount(codes, minlength=len(index))
    if bool((counts < 2).any()):
        lonely = [g for g, i in index.items() if counts[i] < 2]
        raise ValueError(f"groups with fewer than 2 completions: {lonely[:5]}")
    return codes, counts


def _centred(values: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    sums = torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, codes, values)
    return values - (sums / counts)[codes]


def grpo(rewards: torch.Tensor, group_ids: Sequence[object], eps: float = 1e-4) -> torch.Tensor:
    """(r − mean_g) / (std_g + eps), unbiased std within the question's group. GRPO (Shao et al.,
    2024, DeepSeekMath); the reference run's estimator."""
    codes, counts = _groups(rewards, group_ids)
    values = rewards.to(torch.float64)
    centred = _centred(values, codes, counts)
    sq = torch.zeros(len(counts), dtype=torch.float64, device=rewards.device).index_add_(0, codes, centred**2)
    std = (sq / (counts - 1)).sqrt()
    return (centred / (std[codes] + eps)).to(rewards.dtype)


def dr_grpo(rewards: torch.Tensor, group_ids: Sequence[object], eps: float = 1e-4) -> torch.Tensor:
    """r − mean_g, no division by the group's std (which favours questions that are almost always
    or almost never solved). Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training")."""
    codes, counts = _groups(rewards, group_ids)
    return _centred(rewards.to(torch.float64), codes, counts).to(rewards.dtype)


def rloo(rewards: torch.Tensor, group_ids: Sequence[object], eps: float = 1e-4) -> torch.Tensor:
    """r_i − mean of the other G − 1 rewards of the group = G/(G − 1) · (r_i − mean_g): the
    leave-one-out baseline. RLOO (Ahmadian et al., 2024, "Back to Basics")."""
    codes, counts = _groups(rewards, group_ids)
    centred = _centred(rewards.to(torch.float64), codes, counts)
    scale = counts.to(torch.float64) / (counts - 1)
    return (centred * scale[codes]).to(rewards.dtype)


def reinforce_pp(rewards: torch.Tensor, group_ids: Sequence[object], eps: float = 1e-4) -> torch.Tensor:
    """r − mean_g, then normalised over the whole batch: (a − mean_batch) / (std_batch + eps),
    unbiased std. REINFORCE++ with a group baseline (Hu, 2025, "REINFORCE++")."""
    codes, counts = _groups(rewards, group_ids)
    centred = _centred(rewards.to(torch.float64), codes, counts)
    std = centred.std() if centred.numel() > 1 else torch.zeros((), dtype=torch.float64)
    return ((centred - centred.mean()) / (std + eps)).to(rewards.dtype)


AdvantageFn = Callable[[torch.Tensor, Sequence[object], float], torch.Tensor]

ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
}


def advantages(name: str, rewards: torch.Tensor, group_ids: Sequence[object], eps: float = 1e-4) -> torch.Tensor:
    try:
        fn = ADVANTAGES[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {sorted(ADVANTAGES)}") from None
    return fn(rewards, group_ids, eps)
