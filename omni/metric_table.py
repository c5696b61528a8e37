"""The metric table: every name a training run logs, what it means, which part computes it, and how
the learner ranks' parts become one value.

One table for the learner ranks, the learner group, the scoring, the trainer and the README (whose
metric section is checked against it by a test). It lives beside the weight-sync protocol because,
like that protocol, both sides of the system agree on it and neither owns it.

``combine`` says how the learner group turns the ranks' parts into the step's value:
``sum`` adds them; ``max`` / ``min`` take the extreme; ``first`` takes rank 0's (values every rank
shares, such as the learning rate); ``per_token`` divides the ranks' summed ``value × tokens`` by
the step's trained tokens; ``per_sampled_token`` divides by the tokens that have a sampler
log-prob; ``ess`` is the effective sample size (Σw)² / (n·Σw²) of the rollout-correction weights
over the n trained tokens, from the ranks' sums of w and w². Metrics not computed by the learner
have ``combine`` "".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

SOURCES = ("learner", "scoring", "trainer", "eval")
COMBINES = ("", "sum", "max", "min", "first", "per_token", "per_sampled_token", "ess")


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    source: str  # who computes it: one of SOURCES
    combine: str = ""  # learner metrics only: one of COMBINES


_TABLE = (
    # scoring: the rewards of the step's completions (orchestrator/scoring.py)
    Metric("reward/total", "mean weighted reward of the step's completions", "scoring"),
    Metric("reward/<name>", "mean of each reward component (accuracy, format, …) before weighting", "scoring"),
    Metric("reward/errors", "reward functions that raised (scored 0)", "scoring"),
    Metric("reward/overlong_penalty", "mean soft length penalty added to the rewards (grpo.overlong: penalty)", "scoring"),
    Metric("data/masked_overlong", "completions cut at the token limit and left out of the loss (grpo.overlong: mask)", "scoring"),
    Metric("reward/group_std", "mean over questions of the standard deviation of a question's G rewards", "scoring"),
    Metric(
        "reward/zero_advantage_groups",
        "share of questions whose G rewards were all equal (no learning signal)",
        "scoring",
    ),
    Metric("completion_length/mean", "mean completion length in tokens", "scoring"),
    Metric("completion_length/max", "longest completion in tokens", "scoring"),
    Metric("completion_length/clipped_ratio", "share of completions cut at sampling.max_new_tokens", "scoring"),
    Metric("rollout/failed_questions", "questions whose rollout failed (broken media, …)", "scoring"),
    Metric("data/completions", "completions the learner trained on", "scoring"),
    Metric("filter/dropped_groups", "questions dropped for equal rewards (grpo.dynamic_sampling)", "scoring"),
    Metric("filter/extra_rollouts", "extra rollouts made to fill the batch (grpo.dynamic_sampling)", "scoring"),
    # learner: sums from the ranks, combined by the group (learner/worker.py, learner/group.py)
    Metric("loss", "the GRPO loss of the step (the ranks' exact shares summed)", "learner", "sum"),
    Metric("kl", "mean per-token KL to the reference model (the configured estimator)", "learner", "per_token"),
    Metric("logprob_mean", "mean log-probability of the trained tokens under the policy (−NLL)", "learner", "per_token"),
    Metric("entropy", "mean token entropy of the policy over the trained tokens (nats)", "learner", "per_token"),
    Metric("clip_fraction", "share of tokens whose surrogate was clipped", "learner", "per_token"),
    Metric("ratio/mean", "mean per-token ratio π/π_old of the trained tokens", "learner", "per_token"),
    Metric("ratio/max", "largest per-token ratio π/π_old", "learner", "max"),
    Metric("ratio/min", "smallest per-token ratio π/π_old", "learner", "min"),
    Metric("grad_norm", "global gradient norm before clipping", "learner", "first"),
    Metric("lr", "learning rate of the step", "learner", "first"),
    Metric("learner/tokens", "completion tokens trained on (end-of-turn included)", "learner", "sum"),
    Metric("learner/input_tokens", "tokens the learner computed (prompts once per micro-batch + completions)", "learner", "sum"),
    Metric("learner/nonfinite_loss", "micro-batches whose loss was not finite", "learner", "sum"),
    Metric(
        "learner/router_balance_loss",
        "the experts' balance loss of the policy's forward, its micro-batches weighted by their share of the step's "
        "sequences (learner.router_aux_loss_coef > 0; the experts per token when balanced)",
        "learner",
        "sum",
    ),
    Metric("learner/step_skipped", "1 if the optimizer step was skipped (non-finite gradient norm)", "learner", "max"),
    Metric(
        "mismatch/token_prob_error",
        "mean |p_learner − p_vLLM| of the sampled tokens (tokens with a sampler log-prob), both under the "
        "sampling distribution (temperature, top-k, top-p)",
        "learner",
        "per_sampled_token",
    ),
    Metric(
        "mismatch/logprob_abs_error",
        "mean |log p_learner − log p_vLLM| of the sampled tokens",
        "learner",
        "per_sampled_token",
    ),
    Metric(
        "mismatch/missing_logprobs",
        "sampled tokens that came back from vLLM without a finite log-prob (left out of the mismatch "
        "metrics and the importance weights)",
        "learner",
        "sum",
    ),
    Metric(
        "mismatch/outside_support",
        "sampled tokens that the learner's own top-k / top-p would have masked (rounding at the boundary, or a "
        "policy one step on); scored in the kept set with that token added",
        "learner",
        "sum",
    ),
    Metric(
        "rollout_correction/kl",
        "KL(vLLM ‖ learner) on the sampled tokens, k3 estimate (r − 1 − log r, r = π/μ)",
        "learner",
        "per_sampled_token",
    ),
    Metric(
        "rollout_correction/log_ppl_diff",
        "mean log μ − mean log π over the sampled tokens (the learner's log-perplexity minus vLLM's)",
        "learner",
        "per_sampled_token",
    ),
    Metric("rollout_correction/masked_share", "share of trained tokens whose correction weight is 0", "learner", "per_token"),
    Metric("rollout_correction/ess", "effective sample size of the correction weights, 1 = no reweighting", "learner", "ess"),
    Metric("memory/learner_peak_gb", "peak GPU memory allocated on a learner rank during the step", "learner", "max"),
    Metric("memory/learner_held_gb", "GPU memory a learner rank's allocator keeps after the step (colocated: after "
           "returning its free cached blocks): what a waking engine cannot use", "learner", "max"),
    Metric("memory/host_used_gb", "host memory in use on a learner rank's node after its step", "learner", "max"),
    Metric("timing/learn_s", "seconds of the learner step (slowest rank)", "learner", "max"),
    # trainer: the loop's own counters and timings (orchestrator/trainer.py)
    Metric("timing/rollout_s", "seconds from submitting the step's questions to having every completion", "trainer"),
    Metric("timing/reward_s", "seconds spent scoring and computing advantages", "trainer"),
    Metric("timing/weight_sync_s", "seconds of the weight push after the step (0 when none)", "trainer"),
    Metric("timing/step_s", "seconds of the whole step", "trainer"),
    Metric("timing/sleep_s", "colocated on GPUs: seconds the engines took to free their GPU memory", "trainer"),
    Metric("timing/wake_s", "colocated on GPUs: seconds the engines took to take their GPU memory back", "trainer"),
    Metric(
        "memory/gpu_used_asleep_gb",
        "colocated on GPUs: memory in use on an engine's GPU while it sleeps (the learner's share)",
        "trainer",
    ),
    Metric(
        "memory/gpu_used_awake_gb",
        "colocated on GPUs: memory in use on an engine's GPU once it woke (learner and engine)",
        "trainer",
    ),
    Metric("throughput/rollout_tokens_per_s", "completion tokens generated per second of rollout", "trainer"),
    Metric("throughput/learner_tokens_per_s", "learner input tokens per second of learning", "trainer"),
    Metric("reward/no_signal_steps", "consecutive steps in which every question's rewards were equal", "trainer"),
    Metric("learner/skipped_steps", "optimizer steps skipped so far (non-finite)", "trainer"),
    Metric("faults/engine_restarts", "rollout engines restarted so far", "trainer"),
    Metric("faults/checkpoint_failures", "checkpoints that could not be written so far", "trainer"),
    Metric("data/epoch", "epochs of the training set drawn so far", "trainer"),
    Metric("data/bad_records", "records skipped so far (data.skip_bad_records)", "trainer"),
    # eval: every eval.every steps on eval.subset questions (evaluation/evaluate.py)
    Metric("eval/accuracy", "validation accuracy (greedy unless eval.mode is sampled)", "eval"),
    Metric("eval/accuracy_lenient", "validation accuracy with the lenient answer parser", "eval"),
    Metric("eval/format_rate", "share of validation completions in the think/answer format", "eval"),
    Metric("eval/completion_length", "mean validation completion length in tokens", "eval"),
    Metric("eval/ablate_<medium>/accuracy", "accuracy with that medium replaced (final evaluation)", "eval"),
)

METRICS: dict[str, Metric] = {m.name: m for m in _TABLE}
LEARNER_METRICS: tuple[Metric, ...] = tuple(m for m in _TABLE if m.source == "learner")


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("".join("[^/]+" if part.startswith("<") else re.escape(part) for part in re.split(r"(<[^>]+>)", name) if part))


_PATTERNS = tuple(_pattern(name) for name in METRICS if "<" in name)


def is_known(name: str) -> bool:
    """True if ``name`` is in the table, reading a ``<…>`` placeholder as part of one path segment."""
    return name in METRICS or any(p.fullmatch(name) for p in _PATTERNS)


def unknown(names: Iterable[str]) -> list[str]:
    """The names in ``names`` that the table does not list (a test keeps this empty for a run)."""
    return sorted(n for n in names if not is_known(n))


def markdown_table() -> str:
    """The README's metric table."""
    lines = ["| metric | meaning | computed by |", "|---|---|---|"]
    lines += [f"| `{m.name}` | {m.meaning} | {m.source} |" for m in _TABLE]
    return "\n".join(lines)
