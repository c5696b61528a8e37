"""A learner group: N ranks as Ray actors, one optimizer step per `train_step` call."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import ray

from learner.checkpoint_io import CheckpointWriteFailed
from learner.grpo import LossNorm
from learner.types import Experience, LearnerSettings
from learner.worker import LearnerWorker
from omni.inputs import completion_mask
from omni.metric_table import LEARNER_METRICS
from omni.weightsync import BucketSpec, GroupInfo

AGREED_ERRORS_S = 30.0  # how long a failed save waits for the other ranks' copies of its error


class LearnerDied(RuntimeError):
    """A learner rank's process ended; the group cannot continue this step."""


def gather(futures: Sequence[Any], what: str) -> list[Any]:
    """Every rank's result, failing fast: a dead rank ends the wait at once instead of after the
    live ranks time out in a collective that can no longer complete."""
    remaining = list(futures)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                raise LearnerDied(f"a learner rank died during {what}: {exc}") from exc
    return ray.get(list(futures))


def shard_indices(experiences: Sequence[Experience], ranks: int, keep_prompts: bool = False) -> list[list[int]]:
    """Which experiences (by position) each rank gets, in the order it runs them.

    By length (longest first, round robin); with ``keep_prompts`` a question's completions stay
    together, one after another, so a rank computes their shared prompt once (whole questions go
    to the rank with the fewest sequences so far).
    """
    shards: list[list[int]] = [[] for _ in range(ranks)]
    if keep_prompts:
        questions: dict[str, list[int]] = {}
        for i, exp in enumerate(experiences):
            questions.setdefault(exp.record.id, []).append(i)
        tokens = [0] * ranks
        for members in sorted(questions.values(), key=lambda m: -len(m)):
            rank = min(range(ranks), key=lambda r: (len(shards[r]), tokens[r]))
            shards[rank].extend(sorted(members, key=lambda i: -len(experiences[i].completion_ids)))
            tokens[rank] += sum(len(experiences[i].completion_ids) for i in members)
    else:
        order = sorted(range(len(experiences)), key=lambda i: (-len(experiences[i].completion_ids), i))
        for pos, i in enumerate(order):
            shards[pos % ranks].append(i)
    return shards


def split_by_question(experiences: Sequence[Experience], parts: int) -> list[list[Experience]]:
    """``parts`` mini-batches of whole questions (a question's completions share a prompt pass
    and a group), as even in completions as the questions allow, in the batch's order."""
    questions: dict[str, list[Experience]] = {}
    for exp in experiences:
        questions.setdefault(exp.record.id, []).append(exp)
    if parts > len(questions):
        raise ValueError(f"{parts} mini-batches for {len(questions)} questions")
    out: list[list[Experience]] = [[] for _ in range(parts)]
    for members in sorted(questions.values(), key=lambda m: -len(m)):
        min(out, key=len).extend(members)
    return out


def shard(experiences: Sequence[Experience], ranks: int, keep_prompts: bool = False) -> list[list[Experience]]:
    """Deal completions to ranks (:func:`shard_indices`) so ranks and micro-batches get similar
    work; pad with zero-weight copies so every rank runs the same micro-batches (under ZeRO-3 each
    forward gathers parameters from every rank)."""
    return padded(experiences, shard_indices(experiences, ranks, keep_prompts))


def padded(experiences: Sequence[Experience], order: Sequence[Sequence[int]]) -> list[list[Experience]]:
    """Each rank's experiences by ``order`` (:func:`shard_indices`), padded at the end with
    zero-weight copies to the longest rank's count."""
    shards = [[experiences[i] for i in idx] for idx in order]
    longest = max(len(s) for s in shards)
    for s in shards:
        filler = s[-1] if s else experiences[0]  # the last question's prompt: already in the last micro-batch
        while len(s) < longest:
            s.append(Experience(filler.record, filler.completion_ids, 0.0, filler.sampler_logprobs, padding=True))
    return shards


class LearnerGroup:
    def __init__(self, settings: LearnerSettings, actor_options: Sequence[dict[str, Any]]) -> None:
        if len(actor_options) != settings.num_ranks:
            raise ValueError(f"{settings.num_ranks} ranks but {len(actor_options)} placements")
        self.settings = settings
        worker_cls = ray.remote(LearnerWorker)
        self.workers = [
            worker_cls.options(**opts).remote(settings, rank, settings.num_ranks)
            for rank, opts in enumerate(actor_options)
        ]
        addr, port = gather([self.workers[0].address.remote()], "setup")[0]
        self.setup_info = gather([w.setup.remote(addr, port) for w in self.workers], "setup")
        self.eos_ids = gather([self.workers[0].eos_token_ids.remote()], "setup")[0]

    def _norm(self, experiences: Sequence[Experience]) -> LossNorm:
        """The counts of the experiences that are trained (a masked overlong one adds nothing;
        padding comes later, when the batch is dealt to the ranks)."""
        real = [e for e in experiences if e.in_loss]
        tokens = sum(sum(completion_mask(e.completion_ids, self.eos_ids)) for e in real)
        return LossNorm(sequences=max(1, len(real)), tokens=float(tokens), length=self.settings.max_new_tokens)

    def train_step(self, experiences: Sequence[Experience]) -> dict[str, float]:
        """The step's optimizer updates on the whole batch: one, or ``epochs_per_batch`` passes of
        ``mini_batches`` each (the batch split by question), whose ratios and clips act against the
        policy before the first update. Returns the step's learner metrics (the names of
        ``omni.metric_table.LEARNER_METRICS``, see :func:`combine`): those of the first update, where the
        policy is the sampler's, with the clip and ratio metrics of the last update and the time,
        tokens and skips of all of them."""
        if not experiences:
            raise ValueError("train_step needs at least one experience")
        s = self.settings
        if s.epochs_per_batch == 1 and s.mini_batches == 1:
            return combine(self._update(experiences))
        old = self.compute_logprobs(experiences)
        batch = [replace(e, old_logprobs=o) for e, o in zip(experiences, old, strict=True)]
        updates = [combine(self._update(part)) for _ in range(s.epochs_per_batch) for part in split_by_question(batch, s.mini_batches)]
        out = dict(updates[0])
        for key in ("clip_fraction", "ratio/mean", "ratio/max", "ratio/min"):
            if key in updates[-1]:
                out[key] = updates[-1][key]
        for key in ("timing/learn_s", "learner/input_tokens", "learner/nonfinite_loss"):
            out[key] = sum(u.get(key, 0.0) for u in updates)
        out["learner/step_skipped"] = max(u.get("learner/step_skipped", 0.0) for u in updates)
        return out

    def _update(self, experiences: Sequence[Experience], clocked: bool = False) -> list[Any]:
        """One optimizer step on ``experiences``, dealt to the ranks; each rank's result."""
        norm = self._norm(experiences)
        shards = shard(experiences, len(self.workers), keep_prompts=self.settings.share_prompts)
        step = "clocked_step" if clocked else "train_step"
        what = "a clocked train step" if clocked else "a train step"
        return gather([getattr(w, step).remote(s, norm) for w, s in zip(self.workers, shards, strict=True)], what)

    def clocked_step(self, experiences: Sequence[Experience]) -> dict[str, Any]:
        """One optimizer update on ``experiences`` with each rank's time split by phase
        (``LearnerWorker.clocked_step``, learner.phases: a diagnostic, slower than a plain step):
        {"metrics": the step's metrics, "phases": rank 0's seconds per phase}."""
        parts = self._update(experiences, clocked=True)
        return {"metrics": combine([p["metrics"] for p in parts]), "phases": parts[0]["phases"]}

    def compute_logprobs(
        self, experiences: Sequence[Experience], reference: bool = False, sampling: bool = False
    ) -> list[list[float]]:
        """Per-token log-probs of each completion (through its end-of-turn token), in input order:
        the tempered distribution's (the loss's), or with ``sampling`` the sampling distribution's
        (what an engine with these weights reports).

        Every rank takes part: under ZeRO-3 a forward gathers each layer's parameters from all
        ranks, so a forward on one rank alone would wait for the others until the collective
        timeout. The experiences are dealt like a train step's (same micro-batches on every rank,
        padded with copies whose results are dropped), so each rank computes its share only.
        """
        if not experiences:
            return []
        keep = self.settings.share_prompts
        order = shard_indices(experiences, len(self.workers), keep_prompts=keep)
        shards = padded(experiences, order)
        parts = gather(
            [w.compute_logprobs.remote(s, reference, sampling) for w, s in zip(self.workers, shards, strict=True)],
            "computing log-probs",
        )
        out: list[list[float] | None] = [None] * len(experiences)
        for indices, rows in zip(order, parts, strict=True):
            for i, row in zip(indices, rows, strict=False):  # rows past the indices are padding
                out[i] = row
        missing = [i for i, row in enumerate(out) if row is None]
        if missing:
            raise RuntimeError(f"compute_logprobs: no result for experiences {missing[:5]}")
        return out  # type: ignore[return-value]

    # weights ----------------------------------------------------------------
    def weight_specs(self, bucket_bytes: int) -> list[BucketSpec]:
        return gather([self.workers[0].weight_specs.remote(bucket_bytes)], "planning the weight buckets")[0]

    def init_weight_sync(self, info: GroupInfo) -> Any:
        """Returns rank 0's future: it completes once every engine has joined too."""
        return self.workers[0].init_weight_sync.remote(info)

    def send_weights(self, specs: Sequence[BucketSpec], channels: Sequence[Any] | None = None) -> list[Any]:
        """Futures of every rank's part of one push: rank 0 broadcasts and the others join ZeRO-3
        gathers, or, with ``channels`` (colocated: one per engine, engine i's for rank i), each
        rank with an engine hands its weights over to it."""
        if channels is not None and len(channels) > len(self.workers):
            raise ValueError(f"{len(channels)} hand-over channels for {len(self.workers)} learner ranks")
        mine = list(channels or [])
        mine += [None] * (len(self.workers) - len(mine))  # ranks without an engine only join the gathers
        return [w.send_weights.remote(list(specs), channel) for w, channel in zip(self.workers, mine, strict=True)]

    def named_weights(self, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
        parts = gather([w.named_weights.remote(names) for w in self.workers], "gathering weights")
        return parts[0]

    # checkpoints ----------------------------------------------------------------
    def save(self, folder: str, client_state: dict[str, Any] | None = None, train_state: bool = True) -> None:
        """Every rank's part of the checkpoint in ``folder``. A write that failed on any rank
        raises `CheckpointWriteFailed` (an OSError naming the ranks and their reasons), which
        every rank raised after the same collectives: the group stays usable."""
        futures = [w.save.remote(folder, client_state, train_state) for w in self.workers]
        try:
            gather(futures, "a checkpoint")
        except ray.exceptions.RayTaskError as exc:
            if not isinstance(exc.cause, CheckpointWriteFailed):
                raise
            # the other ranks raised the same a moment later: read theirs too (Ray logs an error
            # that nobody read as unhandled)
            ready, _ = ray.wait(futures, num_returns=len(futures), timeout=AGREED_ERRORS_S)
            for ref in ready:
                with contextlib.suppress(ray.exceptions.RayError):
                    ray.get(ref)
            raise exc.cause from exc  # the ranks' agreed words, without Ray's remote traceback

    def load_train_state(self, folder: str) -> dict[str, Any]:
        return gather([w.load_train_state.remote(folder) for w in self.workers], "loading the train state")[0]

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)


HELPER_PREFIX = "_"  # parts that only serve a division (``_sampled_tokens``): never a metric
# the count each averaged rule divides by: a metric of the table or a helper count of the parts
DENOMINATORS = {"per_token": "learner/tokens", "per_sampled_token": "_sampled_tokens"}


def combine(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The ranks' parts (rank 0 first) → the step's learner metrics, by each metric's ``combine``
    rule in ``omni.metric_table.LEARNER_METRICS``.

    A metric is in the result when some rank reported it (no GPU: no memory) and, for an average
    over sampled tokens, when some token had a sampler log-prob (else no mismatch metrics); an
    average over trained tokens of a step without any is 0. A part that the table does not name
    is an error: it would be computed and silently dropped.
    """
    if not parts:
        raise ValueError("combine needs the parts of at least one rank")
    known = {m.name for m in LEARNER_METRICS}
    strays = sorted({k for p in parts for k in p if k not in known and not k.startswith(HELPER_PREFIX)})
    if strays:
        raise ValueError(f"learner rank(s) reported metrics that omni.metric_table does not list: {strays}")
    out: dict[str, float] = {}
    for metric in LEARNER_METRICS:
        values = [p[metric.name] for p in parts if metric.name in p]
        if not values and metric.combine != "ess":  # ess comes from helper sums alone
            continue
        rule = metric.combine
        if rule == "sum":
            out[metric.name] = float(sum(values))
        elif rule == "max":
            out[metric.name] = float(max(values))
        elif rule == "min":
            out[metric.name] = float(min(values))
        elif rule == "first":
            if metric.name not in parts[0]:
                raise ValueError(f"{metric.name}: rank 0 did not report it (combine 'first' takes rank 0's)")
            out[metric.name] = float(parts[0][metric.name])
        elif rule == "ess":
            weights, squares = (sum(p.get(k, 0.0) for p in parts) for k in ("_weight_sum", "_weight_sq_sum"))
            tokens = sum(p.get("learner/tokens", 0.0) for p in parts)
            if squares > 0 and tokens > 0:
                out[metric.name] = weights**2 / (tokens * squares)
        elif rule in DENOMINATORS:
            name = DENOMINATORS[rule]
            count = sum(p.get(name, 0.0) for p in parts)
            if rule == "per_token":
                out[metric.name] = float(sum(values)) / max(count, 1.0)
            elif count > 0:
                out[metric.name] = float(sum(values)) / count
        else:
            raise ValueError(f"{metric.name}: unknown combine rule {rule!r} in omni.metric_table")
    return out
