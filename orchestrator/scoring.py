"""Scoring a step, pure (no Ray): rollout results + their records + the rewards → the experiences
the learner trains on, each with its advantage, the records that failed, and the step's reward
metrics.

A group is a question id, everywhere: advantages are normalised over the completions of one
question id, and ``reward/group_std`` / ``reward/zero_advantage_groups`` (which drives the
no-signal warning) count the same groups. A question drawn twice in one step (a batch that spans
an epoch boundary) is one group of 2·G.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avqa import Record
from learner.advantages import advantages as compute_advantages
from learner.types import Experience
from rewards import RewardSet
from rollout.types import RolloutResult
from watch.samples import ScoredCompletion


class RolloutFailed(RuntimeError):
    """A question failed in rollout and the config does not allow skipping it."""


@dataclass(frozen=True)
class ScoringRules:
    """How a step's rewards become advantages (built from ``grpo.*`` by orchestrator.settings)."""

    adv_eps: float = 1e-4
    advantage: str = "grpo"  # learner.advantages.ADVANTAGES
    skip_failed: bool = False  # data.skip_bad_records: a failed question is listed, not fatal
    overlong: str = "none"  # none | mask | penalty, for completions cut at max_new_tokens
    max_new_tokens: int = 768
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


def overlong_penalty(length: int, rules: ScoringRules) -> float:
    """DAPO's soft overlong punishment (Yu et al., 2025): 0 up to max_new_tokens − buffer, then
    falling linearly to −penalty at the limit."""
    start = rules.max_new_tokens - rules.overlong_buffer
    if length <= start:
        return 0.0
    return -rules.overlong_penalty * min(1.0, (length - start) / rules.overlong_buffer)


@dataclass
class ScoredStep:
    experiences: list[Experience]
    metrics: dict[str, float]
    failed: list[dict[str, Any]] = field(default_factory=list)  # bad_records.jsonl entries
    # every completion of the step's first rollout in rollout order, kept through the filters like
    # ``metrics`` (what was generated and scored, not what was trained on)
    completions: list[ScoredCompletion] = field(default_factory=list)
    flat: set[str] = field(default_factory=set)  # question ids without signal (`flat_groups`)


def score_step(
    step: int,
    records: Sequence[Record],
    results: Sequence[RolloutResult],
    rewards: RewardSet,
    rules: ScoringRules,
) -> ScoredStep:
    """Score every completion, compute advantages per question id (``rules.advantage``), and
    summarise the rewards.

    A question whose rollout failed raises `RolloutFailed` naming its file, record and error,
    unless ``rules.skip_failed`` (``data.skip_bad_records``), which lists it in ``failed`` instead.
    Overlong completions (cut at the token limit): ``penalty`` adds the soft length penalty to
    their reward; ``mask`` keeps them in their group's baseline but out of the loss.
    """
    if len(records) != len(results):
        raise ValueError(f"step {step}: {len(records)} questions but {len(results)} rollout results")
    failed: list[dict[str, Any]] = []
    kept: list[tuple[Record, Any]] = []  # (record, completion) in rollout order
    scores: list[Any] = []
    for record, result in zip(records, results, strict=True):
        if not result.ok:
            if not rules.skip_failed:
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
    lengths = [len(completion.token_ids) for _, completion in kept]
    cut = [completion.finish_reason == "length" for _, completion in kept]
    totals = torch.tensor([s.total for s in scores], dtype=torch.float64)
    metrics: dict[str, float] = {}
    if rules.overlong == "penalty":
        penalties = torch.tensor([overlong_penalty(n, rules) for n in lengths], dtype=torch.float64)
        totals = totals + penalties
        metrics["reward/overlong_penalty"] = float(penalties.mean())
    flat = flat_groups(totals.tolist(), ids)
    advantages = compute_advantages(rules.advantage, totals, ids, rules.adv_eps).tolist()
    # a group without signal learns nothing: its advantages are 0 exactly, not the float noise of
    # (r - mean) / (std + eps) over sums like 0.1 + 0.0 (1e-13, enough to pass for signal)
    advantages = [0.0 if q in flat else a for q, a in zip(ids, advantages, strict=True)]
    masked = [rules.overlong == "mask" and c for c in cut]
    experiences = [
        Experience(record, completion.token_ids, float(adv), completion.logprobs, overlong_masked=is_masked)
        for (record, completion), adv, is_masked in zip(kept, advantages, masked, strict=True)
    ]
    completions = [
        ScoredCompletion(record, completion.text, len(completion.token_ids), completion.finish_reason,
                         dict(score.components), total, float(adv))
        for (record, completion), score, total, adv in zip(kept, scores, totals.tolist(), advantages, strict=True)
    ]
    if rules.overlong == "mask":
        metrics["data/masked_overlong"] = float(sum(masked))
    metrics.update({
        "reward/total": float(totals.mean()),
        **{f"reward/{name}": float(np.mean([s.components[name] for s in scores])) for name in rewards.weights},
        "reward/errors": float(sum(len(s.errors) for s in scores)),
        "completion_length/mean": float(np.mean(lengths)),
        "completion_length/max": float(np.max(lengths)),
        "completion_length/clipped_ratio": sum(cut) / len(kept),
        "rollout/failed_questions": float(len(failed)),
        "data/completions": float(len(experiences) - sum(masked)),
        **group_metrics(totals, ids),
    })
    return ScoredStep(experiences=experiences, metrics=metrics, failed=failed, completions=completions, flat=flat)


NO_SIGNAL_TOL = 1e-9  # rewards closer than this (relative to their size) are one value


def _groups(rewards: Sequence[float], ids: Sequence[str]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = {}
    for question, reward in zip(ids, rewards, strict=True):
        groups.setdefault(question, []).append(float(reward))
    return groups


def flat_groups(rewards: Sequence[float], ids: Sequence[str]) -> set[str]:
    """The question ids whose rewards are all equal, to float noise: nothing to learn from them.
    The one definition of "no signal", for the metric, the no-signal warning and dynamic sampling."""
    return {q for q, v in _groups(rewards, ids).items() if max(v) - min(v) <= NO_SIGNAL_TOL * max(1.0, *map(abs, v))}


def group_metrics(rewards: torch.Tensor, ids: Sequence[str]) -> dict[str, float]:
    """Per question id: the mean spread of its rewards, and the share of ids without signal
    (`flat_groups`: every advantage 0)."""
    groups = _groups(rewards.tolist(), ids)
    stds = [float(np.std(values, ddof=1)) for values in groups.values()]
    return {
        "reward/group_std": float(np.mean(stds)),
        "reward/zero_advantage_groups": len(flat_groups(rewards.tolist(), ids)) / len(groups),
    }


def informative(scored: ScoredStep) -> tuple[ScoredStep, int]:
    """The step without the questions whose rewards were all equal (every advantage 0: nothing
    to learn), and how many were dropped."""
    flat = scored.flat & set(_by_question(scored.experiences))
    kept = [e for e in scored.experiences if e.record.id not in flat]
    return ScoredStep(kept, dict(scored.metrics), list(scored.failed), scored.completions), len(flat)


def fill_informative(
    scored: ScoredStep, draw: Callable[[int], ScoredStep], want: int, max_rounds: int
) -> ScoredStep:
    """DAPO's dynamic sampling (Yu et al., 2025): drop the questions without signal and roll out
    more (``draw(count)`` scores ``count`` new questions) until ``want`` questions have signal or
    ``max_rounds`` extra rollouts were made; at most ``want`` questions are kept. The step's
    reward metrics stay those of its first rollout; ``filter/*`` count what was dropped and drawn."""
    kept, dropped = informative(scored)
    rounds = 0
    while len(_by_question(kept.experiences)) < want and rounds < max_rounds:
        rounds += 1
        more, lost = informative(draw(want - len(_by_question(kept.experiences))))
        kept = ScoredStep(kept.experiences + more.experiences, kept.metrics, kept.failed + more.failed,
                          kept.completions)
        dropped += lost
    questions = list(_by_question(kept.experiences))[:want]
    experiences = [e for e in kept.experiences if e.record.id in set(questions)]
    if not experiences:  # nothing had signal: learn on the batch as it came (every advantage 0)
        experiences = scored.experiences
    metrics = {**kept.metrics, "filter/dropped_groups": float(dropped), "filter/extra_rollouts": float(rounds),
               "data/completions": float(sum(not e.overlong_masked for e in experiences))}
    return ScoredStep(experiences, metrics, kept.failed, kept.completions)


def _by_question(experiences: Sequence[Experience]) -> dict[str, list[Experience]]:
    out: dict[str, list[Experience]] = {}
    for exp in experiences:
        out.setdefault(exp.record.id, []).append(exp)
    return out
