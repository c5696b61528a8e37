"""Scoring a step, pure (no Ray): rollout results + their records + the rewards → the experiences
the learner trains on, each with its advantage, the records that failed, and the step's reward
metrics.

A group is a question id, everywhere: advantages are normalised over the completions of one
question id, and ``reward/group_std`` / ``reward/zero_advantage_groups`` (which drives the
no-signal warning) count the same groups. A question drawn twice in one step (a batch that spans
an epoch boundary) is one group of 2·G.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avqa import Record
from learner.grpo import group_advantages_by_id
from learner.types import Experience
from rewards import RewardSet
from rollout.types import RolloutResult


class RolloutFailed(RuntimeError):
    """A question failed in rollout and the config does not allow skipping it."""


@dataclass
class ScoredStep:
    experiences: list[Experience]
    metrics: dict[str, float]
    failed: list[dict[str, Any]] = field(default_factory=list)  # bad_records.jsonl entries


def score_step(
    step: int,
    records: Sequence[Record],
    results: Sequence[RolloutResult],
    rewards: RewardSet,
    *,
    adv_eps: float,
    skip_failed: bool,
) -> ScoredStep:
    """Score every completion, normalise advantages per question id, and summarise the rewards.

    A question whose rollout failed raises `RolloutFailed` naming its file, record and error,
    unless ``skip_failed`` (``data.skip_bad_records``), which lists it in ``failed`` instead.
    """
    if len(records) != len(results):
        raise ValueError(f"step {step}: {len(records)} questions but {len(results)} rollout results")
    failed: list[dict[str, Any]] = []
    kept: list[tuple[Record, Any]] = []  # (record, completion) in rollout order
    scores: list[Any] = []
    for record, result in zip(records, results, strict=True):
        if not result.ok:
            if not skip_failed:
                raise RolloutFailed(
                    f"step {step}: question {record.id!r} ({record.source_file}, record {record.index}) "
                    f"failed in rollout: {result.error} (set data.skip_bad_records: true to skip such records)"
                )
            failed.append({"split": "train", "stage": "rollout", "step": step, "id": record.id,
                           "file": record.source_file, "index": record.index, "error": result.error})
            continue
        for completion in result.completions:
            kept.append((record, completion))
            scores.append(rewards.score(completion.text, record))
    if not kept:
        raise RolloutFailed(f"step {step}: every question of the batch failed in rollout")
    ids = [record.id for record, _ in kept]
    totals = torch.tensor([s.total for s in scores], dtype=torch.float64)
    advantages = group_advantages_by_id(totals, ids, eps=adv_eps).tolist()
    experiences = [
        Experience(record, completion.token_ids, float(adv), completion.logprobs)
        for (record, completion), adv in zip(kept, advantages, strict=True)
    ]
    lengths = [len(completion.token_ids) for _, completion in kept]
    metrics: dict[str, float] = {
        "reward/total": float(totals.mean()),
        **{f"reward/{name}": float(np.mean([s.components[name] for s in scores])) for name in rewards.weights},
        "reward/errors": float(sum(len(s.errors) for s in scores)),
        "completion_length/mean": float(np.mean(lengths)),
        "completion_length/max": float(np.max(lengths)),
        "completion_length/clipped_ratio": sum(c.finish_reason == "length" for _, c in kept) / len(kept),
        "rollout/failed_questions": float(len(failed)),
        "data/completions": float(len(experiences)),
        **group_metrics(totals, ids),
    }
    return ScoredStep(experiences=experiences, metrics=metrics, failed=failed)


def group_metrics(rewards: torch.Tensor, ids: Sequence[str]) -> dict[str, float]:
    """Per question id: the mean spread of its rewards, and the share of ids whose rewards were all
    equal (every advantage 0: nothing to learn from that question)."""
    groups: dict[str, list[float]] = {}
    for question, reward in zip(ids, rewards.tolist(), strict=True):
        groups.setdefault(question, []).append(reward)
    stds = [float(np.std(values, ddof=1)) for values in groups.values()]
    return {
        "reward/group_std": float(np.mean(stds)),
        "reward/zero_advantage_groups": float(np.mean([max(v) == min(v) for v in groups.values()])),
    }
