"""A learner group: N ranks as Ray actors, one optimizer step per `train_step` call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from learner.grpo import LossNorm
from learner.types import Experience, LearnerSettings
from learner.worker import LearnerWorker
from omni.inputs import completion_mask
from omni.weightsync import BucketSpec, GroupInfo


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


def shard(experiences: Sequence[Experience], ranks: int, keep_prompts: bool = False) -> list[list[Experience]]:
    """Deal completions to ranks so ranks and micro-batches get similar work; pad with zero-weight
    copies so every rank runs the same micro-batches.

    By length (longest first, round robin); with ``keep_prompts`` a question's completions stay
    together, one after another, so a rank computes their shared prompt once (whole questions go
    to the rank with the fewest sequences so far).
    """
    shards: list[list[Experience]] = [[] for _ in range(ranks)]
    if keep_prompts:
        questions: dict[str, list[Experience]] = {}
        for exp in experiences:
            questions.setdefault(exp.record.id, []).append(exp)
        tokens = [0] * ranks
        for members in sorted(questions.values(), key=lambda m: -len(m)):
            rank = min(range(ranks), key=lambda r: (len(shards[r]), tokens[r]))
            shards[rank].extend(sorted(members, key=lambda e: -len(e.completion_ids)))
            tokens[rank] += sum(len(e.completion_ids) for e in members)
    else:
        order = sorted(range(len(experiences)), key=lambda i: (-len(experiences[i].completion_ids), i))
        for pos, i in enumerate(order):
            shards[pos % ranks].append(experiences[i])
    longest = max(len(s) for s in shards)
    for s in shards:
        filler = s[-1] if s else experiences[0]  # the last question's prompt: already in the last micro-batch
        while len(s) < longest:
            s.append(Experience(filler.record, filler.completion_ids, 0.0, filler.sampler_logprobs, dummy=True))
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
        addr, port = ray.get(self.workers[0].address.remote())
        self.setup_info = gather([w.setup.remote(addr, port) for w in self.workers], "setup")
        self.eos_ids = ray.get(self.workers[0].eos_token_ids.remote())

    def _norm(self, experiences: Sequence[Experience]) -> LossNorm:
        tokens = sum(sum(completion_mask(e.completion_ids, self.eos_ids)) for e in experiences)
        return LossNorm(sequences=len(experiences), tokens=float(tokens), length=self.settings.max_new_tokens)

    def train_step(self, experiences: Sequence[Experience]) -> dict[str, float]:
        """One optimizer step on the whole batch; returns averaged metrics."""
        if not experiences:
            raise ValueError("train_step needs at least one experience")
        norm = self._norm(experiences)
        shards = shard(experiences, len(self.workers), keep_prompts=self.settings.share_prompts)
        parts = gather([w.train_step.remote(s, norm) for w, s in zip(self.workers, shards, strict=True)], "a train step")
        return combine(parts)

    def compute_logprobs(self, experiences: Sequence[Experience], reference: bool = False) -> list[list[float]]:
        return ray.get(self.workers[0].compute_logprobs.remote(list(experiences), reference))

    # weights ----------------------------------------------------------------
    def weight_specs(self, bucket_bytes: int) -> list[BucketSpec]:
        return ray.get(self.workers[0].weight_specs.remote(bucket_bytes))

    def init_weight_sync(self, info: GroupInfo) -> Any:
        """Returns rank 0's future: it completes once every engine has joined too."""
        return self.workers[0].init_weight_sync.remote(info)

    def send_weights(self, specs: Sequence[BucketSpec]) -> list[Any]:
        """Futures of every rank's part of one push (rank 0 sends, others join ZeRO-3 gathers)."""
        return [w.send_weights.remote(list(specs)) for w in self.workers]

    def named_weights(self, names: Sequence[str] | None = None) -> list[tuple[str, Any]]:
        parts = gather([w.named_weights.remote(names) for w in self.workers], "gathering weights")
        return parts[0]

    # checkpoints ----------------------------------------------------------------
    def save(self, folder: str, client_state: dict[str, Any] | None = None, train_state: bool = True) -> None:
        gather([w.save.remote(folder, client_state, train_state) for w in self.workers], "a checkpoint")

    def load_train_state(self, folder: str) -> dict[str, Any]:
        return gather([w.load_train_state.remote(folder) for w in self.workers], "loading the train state")[0]

    def kill(self) -> None:
        for w in self.workers:
            ray.kill(w)


def combine(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """Rank sums → step metrics."""
    total: dict[str, float] = {}
    for key in ("loss", "logp_sum", "tokens", "sequences", "kl_sum", "clip_sum", "input_tokens", "mismatch_sum",
                "logp_gap_sum", "mismatch_tokens", "nonfinite_loss"):
        total[key] = sum(p.get(key, 0.0) for p in parts)
    tokens = max(total["tokens"], 1.0)
    out = {
        "loss": total["loss"],
        "kl": total["kl_sum"] / tokens,
        "logprob_mean": total["logp_sum"] / tokens,  # mean log π of the trained tokens (−NLL)
        "clip_fraction": total["clip_sum"] / tokens,
        "grad_norm": parts[0]["grad_norm"],
        "lr": parts[0]["lr"],
        "tokens": total["tokens"],
        "sequences": total["sequences"],
        "input_tokens": total["input_tokens"],
        "learn_seconds": max(p["learn_seconds"] for p in parts),
        "nonfinite_loss": total["nonfinite_loss"],
        "skipped": max(p.get("skipped", 0.0) for p in parts),
    }
    if total["mismatch_tokens"] > 0:
        out["mismatch/token_prob_error"] = total["mismatch_sum"] / total["mismatch_tokens"]
        out["mismatch/logprob_abs_error"] = total["logp_gap_sum"] / total["mismatch_tokens"]
    peaks = [p["peak_memory_gb"] for p in parts if "peak_memory_gb" in p]
    if peaks:
        out["memory/learner_peak_gb"] = max(peaks)
    return out
