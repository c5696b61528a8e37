"""The step loop: sample questions → roll out → reward → advantages → learn → push weights.

One optimizer step per batch (the reference run's semantics); with ``grpo.off_policy`` the rollout
of step t+1 runs while the learner trains on step t, corrected by importance weights.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from avqa import Record
from evaluation.evaluate import evaluate_in_run
from evaluation.results import gain_summary
from learner.group import LearnerDied, LearnerGroup
from omni.names import require_safetensors
from omni.sizes import model_shape
from orchestrator import checkpoint as ckpt
from orchestrator.config import RunConfig, dump_config
from orchestrator.data import RunData, load_run_data
from orchestrator.gpu_sharing import GpuSharing
from orchestrator.paths import with_absolute_paths
from orchestrator.placement import Placement, cluster_gpus, node_memory_gib, place
from orchestrator.plan import RunPlan, cluster_of, make_plan, needs_weights, ray_cpus
from orchestrator.ray_connect import connect
from orchestrator.run_state import COUNTERS, PendingBatch, RunState
from orchestrator.sampler import QuestionSampler, request_salts
from orchestrator.scoring import ScoredStep, fill_informative, score_step
from orchestrator.teardown import SHUTDOWN_TIMEOUT_S, kill_and_wait
from orchestrator.weight_sync import WeightSync
from rewards import RewardSet
from rollout.engine import RolloutEngine
from rollout.pool import EngineDied, EnginePool, PendingRollout
from rollout.types import RolloutResult
from watch.metrics_log import MetricsLogger
from watch.samples import SAMPLES_FILE, SampleLog


@dataclass
class Batch:
    """One step's questions and what came back for them."""

    step: int
    indices: list[int]
    records: list[Record]
    salts: list[int | str] = field(default_factory=list)  # per question: its request seeds' salt
    pending: PendingRollout | None = None
    results: list[RolloutResult] = field(default_factory=list)
    rollout_seconds: float = 0.0
    submitted_at: float = 0.0
    reward_seconds: float = 0.0


class Trainer:
    """Starts the actors of a `RunPlan` and runs its steps; nothing here reads the run config."""

    def __init__(self, plan: RunPlan, data: RunData, *, console: bool = True) -> None:
        self.plan = plan
        self.schedule = plan.schedule
        self.run_dir = plan.run_dir
        self.console = console
        self.resume_from = plan.resume_from
        self.bad_records = data.bad
        self.train_records = data.train
        self.valid_records = data.valid
        self.total_steps = plan.schedule.total_steps
        self.rewards = RewardSet(weights=dict(plan.reward_weights), options=dict(plan.reward_options))
        self.sampler = QuestionSampler(len(self.train_records), plan.seed, shuffle=plan.schedule.shuffle)
        self.step = 0
        self.placement: Placement | None = None
        self.pool: EnginePool | None = None
        self.learner: LearnerGroup | None = None
        self.sync: WeightSync | None = None
        self.engines: list[Any] = []
        self.engine_restarts = 0
        self.skipped_steps = 0
        self.no_signal_steps = 0  # consecutive steps whose every group had one reward value
        self.checkpoint_failures = 0
        self.restarts = 0  # automatic restarts of this run (all calls), set by train()
        self.pending: Batch | None = None  # one step off policy: the next step's rollout
        self.drawn: dict[int, Counter[str]] = {}  # step → question id → times drawn in that step
        self.sleeps = plan.layout.engines_sleep  # colocated on GPUs: engines sleep while the learner trains
        self.sharing = GpuSharing(self._on_engines, enabled=self.sleeps, sync_every=plan.sync.every)

    # ------------------------------------------------------------------ setup
    def _say(self, message: str) -> None:
        if self.console:
            print(f"[echoink] {message}", flush=True)

    def start(self) -> None:
        plan = self.plan
        (self.run_dir / "config.yaml").write_text(dump_config(plan.config_record), encoding="utf-8")
        self.placement = place(plan.layout)
        self._say(f"placement: {self.placement.mode} ({self.placement.why})")
        started = time.perf_counter()
        self.engines = [self._new_engine(i) for i in range(len(self.placement.engine_options))]
        if self.sleeps:  # vLLM sizes its cache from the free memory: let it start before the learner
            ray.get([e.info.remote() for e in self.engines])
        self.learner = LearnerGroup(plan.learner, self.placement.learner_options)
        engine_info = ray.get([e.info.remote() for e in self.engines])
        self.pool = EnginePool(self.engines)
        placement = self.placement.record(engine_info, self.learner.setup_info)
        (self.run_dir / "placement.json").write_text(json.dumps(placement, indent=2, default=str) + "\n")
        self.sync = WeightSync(
            self.learner,
            self.pool,
            backend=plan.sync.backend,
            bucket_bytes=plan.sync.bucket_bytes,
            tensor_parallel_size=plan.sync.tensor_parallel_size,
            timeout_s=plan.sync.timeout_s,
            transport=plan.sync.transport,
        )
        self._say(
            f"{len(self.engines)} rollout engine(s), {plan.learner.num_ranks} learner rank(s) "
            f"(ZeRO-{plan.learner.zero_stage}) up in {time.perf_counter() - started:.0f} s; {self.total_steps} steps "
            f"of {self.schedule.questions_per_step} questions × {self.schedule.group_size}"
        )
        if self.resume_from is not None:
            state = RunState.from_json(ckpt.read_run_state(self.resume_from), str(self.resume_from / ckpt.RUN_STATE))
            self.learner.load_train_state(str(self.resume_from))
            self.sampler.load_state_dict(state.sampler)
            self.step = state.step
            for name, value in state.counters.items():
                setattr(self, name, value)
            if state.pending is not None:  # one step off policy: the next step's rollout, as it was
                p = state.pending
                self.pending = Batch(step=p.step, indices=p.indices, records=[self.train_records[i] for i in p.indices],
                                     salts=p.salts, results=p.results, rollout_seconds=p.rollout_seconds)
                self._salts(p.step, self.pending.records)  # its questions count as drawn in that step
            for name in ("metrics.jsonl", "questions.jsonl", SAMPLES_FILE):
                ckpt.truncate_jsonl(self.run_dir / name, self.step)  # drop steps done after that checkpoint
            self._say(f"resumed from {self.resume_from} at step {self.step}")

    def _new_engine(self, index: int) -> Any:
        assert self.placement is not None
        options = self.placement.engine_start_options(index)  # named; a restart gets a new name
        return ray.remote(RolloutEngine).options(**options).remote(self.plan.engine, index)

    def _restart_engines(self, dead: list[int], why: str) -> None:
        """Replace dead engines in their placement bundles, rebuild the sync group, push the
        current weights; a configured limit ends the run instead of looping."""
        assert self.pool is not None and self.sync is not None
        limit = self.schedule.max_engine_restarts
        self.engine_restarts += len(dead)
        if self.engine_restarts > limit:
            raise RuntimeError(
                f"rollout engine(s) {dead} died ({why}); {self.engine_restarts} engine restarts exceed "
                f"faults.max_engine_restarts={limit}; {ckpt.last_checkpoint_words(self.run_dir)}. "
                f"Continue with --resume once the cause is fixed."
            )
        self._say(f"rollout engine(s) {dead} died ({why}): restarting ({self.engine_restarts}/{limit})")
        for index in dead:
            with contextlib.suppress(Exception):
                ray.kill(self.pool.engines[index])
            self.pool.replace(index, self._new_engine(index))
        self.engines = list(self.pool.engines)
        ray.get([self.pool.engines[i].ping.remote() for i in dead])
        self.sync.connect()
        try:
            self.sync.push()
        except EngineDied as exc:  # died again before it had the weights: counted, and limited
            self._restart_engines(exc.engines, why)

    # ------------------------------------------------------------------ the loop
    def _salts(self, step: int, records: list[Record]) -> list[int | str]:
        for old in [s for s in self.drawn if s < step - 1]:  # a step and the next (off policy) are open
            del self.drawn[old]
        return request_salts(step, [r.id for r in records], self.drawn.setdefault(step, Counter()))

    def _submit(self, step: int, count: int | None = None) -> Batch:
        assert self.pool is not None
        indices = self.sampler.next(count or self.schedule.questions_per_step)
        records = [self.train_records[i] for i in indices]
        batch = Batch(step=step, indices=indices, records=records, salts=self._salts(step, records),
                      submitted_at=time.perf_counter())
        batch.pending = self.pool.submit(records, self.schedule.group_size, self.plan.sampling, salt=batch.salts)
        return batch

    def _collect(self, batch: Batch) -> None:
        """The batch's results; questions of an engine that died are generated again (same seeds)
        on the restarted engine, so none is lost or counted twice."""
        assert self.pool is not None and batch.pending is not None
        results, dead = self.pool.collect_partial(batch.pending)
        while dead:
            self._restart_engines(dead, f"during the rollout of step {batch.step}")
            lost = [i for i, r in enumerate(results) if r is None]
            retry = self.pool.submit([batch.records[i] for i in lost], self.schedule.group_size,
                                     self.plan.sampling, salt=[batch.salts[i] for i in lost])
            part, dead = self.pool.collect_partial(retry)
            for i, result in zip(lost, part, strict=True):
                results[i] = result
        batch.results = [r for r in results if r is not None]
        batch.rollout_seconds = time.perf_counter() - batch.submitted_at
        batch.pending = None

    def _push(self) -> float:
        """Push the weights to every engine; engines that died meanwhile are restarted (and get
        the weights from the restart), up to ``faults.max_engine_restarts``. A dead learner rank
        raises `LearnerDied` to `train()`."""
        assert self.sync is not None and self.pool is not None
        started = time.perf_counter()
        try:
            return self.sync.push().seconds
        except EngineDied as exc:
            self._restart_engines(exc.engines, "during a weight push")
        except TimeoutError:
            dead = [i for i, ok in enumerate(self.pool.alive()) if not ok]
            if not dead:
                raise
            self._restart_engines(dead, "during a weight push")
        return time.perf_counter() - started

    def _on_engines(self, method: str, *args: Any) -> list[dict[str, float]]:
        """Call ``method`` on every engine; engines that died are restarted (awake, with the
        current weights) like engines that die in a rollout."""
        assert self.pool is not None
        futures = [getattr(e, method).remote(*args) for e in self.pool.engines]
        reports, dead = [], []
        for index, future in enumerate(futures):
            try:
                reports.append(ray.get(future))
            except ray.exceptions.RayActorError:
                dead.append(index)
        if dead:
            self._restart_engines(dead, f"during {method}")
        return reports

    def run(self) -> dict[str, Any]:
        if self.learner is None:
            self.start()
        c = self.schedule
        self._say(f"first weight push: {self.sync.tensors} tensors in {len(self.sync.specs)} buckets ({self.sync.transport})")
        self._push()  # once at start (and after a resume)
        start_eval: dict[str, float] | None = None
        if c.eval_at_start and self.step == 0 and self.valid_records:
            start_eval = self._evaluate("start")  # before the progress bar
        logger = MetricsLogger(self.run_dir, total_steps=self.total_steps, start_step=self.step, console=self.console)
        samples = SampleLog(self.run_dir, every=c.samples_every, count=c.samples_per_step,
                            media=self.plan.media, writer=logger.writer)
        last: dict[str, float] = {}
        end = self.total_steps if c.stop_after is None else min(self.total_steps, self.step + c.stop_after)
        try:
            while self.step < end:
                step = self.step + 1
                step_started = time.perf_counter()
                if self.pending is None:
                    batch = self._submit(step)
                    self._collect(batch)
                else:
                    batch, self.pending = self.pending, None
                self._record_questions(batch)
                if c.off_policy and step < self.total_steps:
                    # rolls out on the current weights while we learn; also past a --stop-after-steps
                    # end, where the checkpoint keeps it for the resumed run
                    self.pending = self._submit(step + 1)
                scored = self._score(batch)
                samples.log(step, scored.completions)
                asleep = self.sharing.sleep()
                values = self._learn(batch, scored)
                self._check_skipped(values, step)
                self._check_signal(values, step, logger)
                if self.pending is not None:
                    self._collect(self.pending)  # engines finish the next rollout before new weights arrive
                values.update(asleep)
                push = step % self.plan.sync.every == 0 or step == self.total_steps
                values.update(self.sharing.wake_and_push(self._push if push else None))
                self.step = step
                values["timing/step_s"] = time.perf_counter() - step_started
                values["data/epoch"] = self.sampler.state.epoch + self.sampler.state.position / self.sampler.size
                values["data/bad_records"] = float(len(self.bad_records))
                if c.eval_every and step % c.eval_every == 0 and self.valid_records:
                    values.update(self._evaluate())
                logger.log(step, values)
                last = values
                if c.checkpoint_every and step % c.checkpoint_every == 0 and step != end:
                    try:
                        self._checkpoint()
                    except OSError as exc:  # disk full, quota: the previous checkpoint stays whole
                        self.checkpoint_failures += 1
                        logger.note(
                            f"[echoink] checkpoint at step {step} failed ({exc}); keeping "
                            f"{ckpt.latest_checkpoint(self.run_dir)}; training continues"
                        )
            logger.close()
            return self._finish(last, start_eval)
        finally:
            logger.close()

    def _finish(self, last: dict[str, float], start_eval: dict[str, float] | None) -> dict[str, Any]:
        """The last checkpoint, the final evaluation and the paired gain; ``summary.json``."""
        c = self.schedule
        finished = self.step >= self.total_steps
        final = self._checkpoint() if (c.checkpoint_at_end or not finished) else None
        summary: dict[str, Any] = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "finished": finished,
            "run_dir": str(self.run_dir),
            "last": last,
        }
        if final is not None:
            summary["checkpoint"] = str(final)
        if not finished:
            self._say(f"stopped after step {self.step} of {self.total_steps}: continue with --resume")
        elif c.eval_at_end and self.valid_records:
            summary["eval"] = self._evaluate("final")
            if start_eval is not None:
                summary["eval_gain"], table = gain_summary(self.run_dir / "eval" / "start", self.run_dir / "eval" / "final")
                self._say("before (A) and after (B) training, greedy, same questions:\n" + table)
        if start_eval is not None:
            summary["eval_start"] = start_eval
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    def _check_signal(self, values: dict[str, float], step: int, logger: MetricsLogger) -> None:
        """Say so when GRPO has nothing to learn from: with equal rewards in every group each
        advantage is 0 and only the KL term moves the weights (all solved, or all failed)."""
        flat = values.get("reward/zero_advantage_groups", 0.0) >= 1.0
        self.no_signal_steps = self.no_signal_steps + 1 if flat else 0
        values["reward/no_signal_steps"] = float(self.no_signal_steps)
        limit = self.schedule.warn_no_signal_steps
        if limit and self.no_signal_steps == limit:
            logger.note(
                f"[echoink] steps {step - limit + 1}-{step}: every question's {self.schedule.group_size} "
                f"completions got the same reward (accuracy {values.get('reward/accuracy', float('nan')):.2f}, "
                f"format {values.get('reward/format', float('nan')):.2f}), so every advantage is 0 and GRPO "
                f"learns nothing. All failed: check the rewards and the prompt, or warm start the model "
                f"(echoink model warmstart); all solved: harder data or a larger grpo.group_size."
            )

    def _check_skipped(self, values: dict[str, float], step: int) -> None:
        if values.get("learner/step_skipped", 0.0) > 0:
            self.skipped_steps += 1
            limit = self.schedule.max_nonfinite_steps
            self._say(f"step {step}: non-finite loss or gradient norm, optimizer step skipped ({self.skipped_steps}/{limit})")
            if self.skipped_steps >= limit:
                raise RuntimeError(
                    f"{self.skipped_steps} optimizer steps skipped for non-finite loss or gradient norm "
                    f"(faults.max_nonfinite_steps={limit}); the run stops at step {step}. Lower learner.lr, "
                    f"check the rewards, or continue with --resume: {ckpt.last_checkpoint_words(self.run_dir)}."
                )
        values["learner/skipped_steps"] = float(self.skipped_steps)
        values["faults/engine_restarts"] = float(self.engine_restarts)
        values["faults/checkpoint_failures"] = float(self.checkpoint_failures)

    def _record_questions(self, batch: Batch) -> None:
        row = {"step": batch.step, "ids": [r.id for r in batch.records], "indices": batch.indices}
        with open(self.run_dir / "questions.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def _score(self, batch: Batch) -> ScoredStep:
        """Rewards and advantages; with ``grpo.dynamic_sampling`` more questions are rolled out
        (engines awake, before the learner's turn) until the batch has signal."""
        c = self.schedule
        started = time.perf_counter()
        scored = score_step(batch.step, batch.records, batch.results, self.rewards, self.plan.scoring)
        if c.dynamic_sampling:
            scored = fill_informative(scored, lambda n: self._draw(batch.step, n), c.questions_per_step,
                                      c.max_extra_rollouts)
        for entry in scored.failed:
            self.bad_records.add(entry)
        batch.reward_seconds = time.perf_counter() - started
        return scored

    def _draw(self, step: int, count: int) -> ScoredStep:
        extra = self._submit(step, count)
        self._collect(extra)
        self._record_questions(extra)
        return score_step(step, extra.records, extra.results, self.rewards, self.plan.scoring)

    def _learn(self, batch: Batch, scored: ScoredStep) -> dict[str, float]:
        """One learner step on the scored batch; the step's metrics (names: omni.metric_table)."""
        assert self.learner is not None
        learned = self.learner.train_step(scored.experiences)
        generated = sum(len(e.completion_ids) for e in scored.experiences)
        return {
            **scored.metrics,
            **learned,
            "timing/rollout_s": batch.rollout_seconds,
            "timing/reward_s": batch.reward_seconds,
            "throughput/rollout_tokens_per_s": generated / max(batch.rollout_seconds, 1e-9),
            "throughput/learner_tokens_per_s": learned["learner/input_tokens"] / max(learned["timing/learn_s"], 1e-9),
        }

    # ------------------------------------------------------------------ checkpoints & eval
    def _checkpoint(self) -> Path:
        assert self.learner is not None
        pending = None
        if self.pending is not None:
            p = self.pending
            pending = PendingBatch(step=p.step, indices=p.indices, salts=p.salts, results=p.results,
                                   rollout_seconds=p.rollout_seconds)
        state = RunState(step=self.step, total_steps=self.total_steps, sampler=self.sampler.state_dict(),
                         counters={name: int(getattr(self, name)) for name in COUNTERS}, pending=pending,
                         config=self.plan.config_record, time=time.time()).to_json()
        path = ckpt.save_checkpoint(
            self.run_dir, self.step, lambda tmp: self.learner.save(str(tmp), {"step": self.step}),  # type: ignore[union-attr]
            state, keep_last=self.schedule.keep_last, verify=ckpt.verify_model_folder,
        )
        self._say(f"checkpoint: {path}")
        return path

    def _evaluate(self, name: str | None = None) -> dict[str, float]:
        assert self.pool is not None
        return evaluate_in_run(self.pool, self.valid_records, self.plan.eval, subset=self.schedule.eval_subset,
                               run_dir=self.run_dir, step=self.step, name=name, say=self._say)

    def shutdown(self, strict: bool = False, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> list[str]:
        """Kill the run's actors and return once they are gone: DEAD in Ray's actor table and
        their processes ended (`orchestrator.teardown`), so the GPUs they held are free for what
        comes next. Actors still alive after ``timeout_s`` are named in a warning, and with
        ``strict`` in an error; returns their words. A second call does nothing."""
        if self.sync is not None:
            self.sync.close()
        actors = [*(self.learner.workers if self.learner is not None else []), *self.engines]
        self.sync, self.learner, self.engines = None, None, []
        survivors = kill_and_wait(actors, timeout_s) if actors else []
        if self.placement is not None:
            self.placement.remove()  # after the deaths: removing a group kills, but does not wait either
            self.placement = None
        if survivors:
            message = (f"{len(survivors)} actor(s) of the run in {self.run_dir} still running {timeout_s:.0f} s "
                       f"after they were killed, with the memory they hold: {'; '.join(survivors)}")
            if strict:
                raise RuntimeError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self._say(message)
        return survivors


def prepare(
    config: RunConfig, *, resume: bool = False, stop_after: int | None = None, console: bool = True
) -> tuple[RunPlan, RunData]:
    """Everything before the first actor: the run's data, the Ray cluster and the run's plan;
    ``config``'s paths must be absolute (`with_absolute_paths`)."""

    def say(message: str) -> None:
        if console:
            print(f"[echoink] {message}", flush=True)

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        say(f"--resume: no checkpoint in {ckpt.checkpoint_dir(run_dir)}, starting from step 0")
        for name in ("metrics.jsonl", "questions.jsonl", SAMPLES_FILE):
            ckpt.truncate_jsonl(run_dir / name, 0)
    data = load_run_data(config.data, run_dir, say)
    if needs_weights(config):
        require_safetensors(config.model_path)  # before anything starts, Ray included
    where = connect(config.ray.address, config.ray.num_cpus, ray_cpus(config))
    cluster = cluster_of(config.ray.use_gpus, cluster_gpus())
    shape = None
    if cluster.use_gpus and config.placement.check_memory:  # this node's GPUs stand for the cluster's
        gpu_gib, host_gib = node_memory_gib()
        cluster = cluster_of(config.ray.use_gpus, cluster.gpus, gpu_gib, host_gib)
        shape = model_shape(config.model_path)
    plan = make_plan(config, cluster, train_size=len(data.train), records=[*data.train, *data.valid],
                     resume_from=resume_from, stop_after=stop_after, shape=shape)
    say(f"Ray: {where}; {'GPUs' if cluster.use_gpus else 'CPUs only'}; the plan:\n{plan.describe()}")
    return plan, data


def train(
    config: RunConfig, *, resume: bool = False, console: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Run to the end; a learner rank that dies restarts the run from the last checkpoint up to
    ``faults.max_restarts`` times, else the run stops saying how to resume."""
    config = with_absolute_paths(config)  # before any actor sees a path (README: "Paths in the config")
    attempt, restarts = 0, 0
    while True:
        plan, data = prepare(config, resume=resume or attempt > 0, stop_after=stop_after, console=console)
        trainer = Trainer(plan, data, console=console)
        try:
            trainer.start()
            # the run's restarts: those its checkpoint counted, or this call's, whichever knows more
            trainer.restarts = restarts = max(trainer.restarts, restarts) + (attempt > 0)
            summary = trainer.run()
            summary["restarts"] = trainer.restarts
            trainer.shutdown(strict=True)  # returns once the actors are gone (their GPUs free)
            return summary
        except LearnerDied as exc:
            if attempt >= plan.schedule.max_restarts:
                raise RuntimeError(
                    f"{exc}. The run stopped at step {trainer.step}; {ckpt.last_checkpoint_words(plan.run_dir)}. "
                    f"Continue with: echoink train --config <this config> --resume "
                    f"(or set faults.max_restarts to restart automatically)"
                ) from exc
            attempt += 1
            trainer._say(f"{exc}; restarting from {ckpt.latest_checkpoint(plan.run_dir) or 'the start'} "
                         f"({attempt}/{plan.schedule.max_restarts})")
        finally:
            trainer.shutdown()
