"""The step loop: sample questions → roll out → reward → advantages → learn → push weights.

One optimizer step per batch (the reference run's semantics); with ``grpo.off_policy`` the rollout
of step t+1 runs while the learner trains on step t, corrected by importance weights.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from avqa import LoadReport, Record, load_records
from learner.group import LearnerDied, LearnerGroup
from learner.grpo import group_advantages_by_id
from learner.types import Experience, LearnerSettings
from omni.inputs import MediaSettings
from omni.names import require_safetensors
from orchestrator import checkpoint as ckpt
from orchestrator.config import RunConfig, dump_config
from orchestrator.metrics import MetricsLogger
from orchestrator.placement import Placement, decide_gpus, plan
from orchestrator.runtime import connect
from orchestrator.sampler import QuestionSampler
from orchestrator.weights import WeightSync
from rewards import RewardSet
from rollout.engine import RolloutEngine
from rollout.pool import EnginePool, PendingRollout
from rollout.types import EngineSettings, RolloutResult, SamplingSettings


def media_settings(config: RunConfig) -> MediaSettings:
    m = config.media
    return MediaSettings(m.min_pixels, m.max_pixels, m.max_audio_seconds, m.sample_rate)


def sampling_settings(config: RunConfig, seed: int | None) -> SamplingSettings:
    s = config.sampling
    return SamplingSettings(s.temperature, s.top_p, s.top_k, s.max_new_tokens, seed=seed)


def engine_settings(config: RunConfig, model_path: Path | None = None) -> EngineSettings:
    r = config.rollout
    return EngineSettings(
        model_path=Path(model_path or config.model_path),
        tensor_parallel_size=r.tensor_parallel_size,
        max_model_len=r.max_model_len,
        memory_share=r.memory_share,
        kv_cache_bytes=int(r.kv_cache_mb * 2**20) if r.kv_cache_mb else None,
        enforce_eager=r.enforce_eager,
        max_num_seqs=r.max_num_seqs,
        seed=config.seed,
        load_format=r.load_format,
        media=media_settings(config),
        system_prompt=config.system_prompt,
    )


def learner_settings(config: RunConfig, total_steps: int, model_path: Path | None = None) -> LearnerSettings:
    lc, g = config.learner, config.grpo
    return LearnerSettings(
        model_path=Path(model_path or config.model_path),
        num_ranks=lc.num_ranks,
        zero_stage=lc.zero_stage,
        dtype=lc.dtype,
        gradient_checkpointing=lc.gradient_checkpointing,
        micro_batch_size=lc.micro_batch_size,
        lr=lc.lr,
        betas=tuple(lc.betas),
        weight_decay=lc.weight_decay,
        adam_eps=lc.adam_eps,
        lr_schedule=lc.lr_schedule,
        warmup_steps=lc.warmup_steps,
        min_lr_ratio=lc.min_lr_ratio,
        total_steps=total_steps,
        grad_clip=lc.grad_clip,
        freeze_audio_tower=lc.freeze_audio_tower,
        freeze_vision_tower=lc.freeze_vision_tower,
        freeze=tuple(lc.freeze),
        share_prompts=lc.share_prompts,
        attn_implementation=lc.attn_implementation,
        beta=g.beta,
        kl_estimator=g.kl_estimator,
        clip_eps=g.clip_eps,
        loss_agg=g.loss_agg,
        off_policy=g.off_policy,
        is_clip=g.is_clip,
        temperature=config.sampling.temperature,
        max_new_tokens=config.sampling.max_new_tokens,
        logprob_chunk=lc.logprob_chunk,
        seed=config.seed,
        media=media_settings(config),
        system_prompt=config.system_prompt,
        collective_timeout_s=config.faults.collective_timeout_s,
        random_init=lc.random_init,
    )


@dataclass
class Batch:
    """One step's questions and what came back for them."""

    step: int
    indices: list[int]
    records: list[Record]
    pending: PendingRollout | None = None
    results: list[RolloutResult] = field(default_factory=list)
    rollout_seconds: float = 0.0
    submitted_at: float = 0.0


class Trainer:
    def __init__(
        self, config: RunConfig, *, resume: bool = False, console: bool = True, stop_after: int | None = None
    ) -> None:
        self.config = config
        self.stop_after = stop_after
        self.run_dir = Path(config.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.resume_from = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if resume and self.resume_from is None:
            self._say(f"--resume: no checkpoint in {ckpt.checkpoint_dir(self.run_dir)}, starting from step 0")
            for name in ("metrics.jsonl", "questions.jsonl"):
                truncate_jsonl(self.run_dir / name, 0)
        self.bad_records: list[dict[str, Any]] = []
        self.train_records = self._load(config.data.train, "train")
        self.valid_records = self._load(config.data.valid, "valid") if config.data.valid else []
        self.total_steps = config.steps_for(len(self.train_records))
        self.rewards = RewardSet(weights=dict(config.rewards.weights), options={"lenient": config.rewards.lenient})
        self.sampler = QuestionSampler(len(self.train_records), config.seed, shuffle=config.data.shuffle)
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

    # ------------------------------------------------------------------ setup
    def _say(self, message: str) -> None:
        if self.console:
            print(f"[echoink] {message}", flush=True)

    def _load(self, path: Path, split: str) -> list[Record]:
        c = self.config.data
        if not c.skip_bad_records:
            records = load_records(path, media_root=c.media_root)
        else:
            report = LoadReport()
            records = load_records(path, media_root=c.media_root, report=report)
            for err in report.errors:
                self._bad({"split": split, "stage": "load", **err.to_dict(), "error": str(err)})
            if report.skipped:
                self._say(f"{split}: skipped {report.skipped} of {report.total} records (see bad_records.jsonl)")
        if not records:
            raise ValueError(f"{path}: no usable records in the {split} split")
        return records

    def _bad(self, entry: dict[str, Any]) -> None:
        self.bad_records.append(entry)
        with open(self.run_dir / "bad_records.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    def start(self) -> None:
        c = self.config
        if not (c.learner.random_init and c.rollout.load_format == "dummy"):
            require_safetensors(c.model_path)  # before anything starts
        needed = c.rollout.num_engines * c.rollout.cpus_per_engine + c.learner.num_ranks * c.learner.cpus_per_rank
        where = connect(c.ray.address, c.ray.num_cpus, needed)
        use_gpus = decide_gpus(c.ray.use_gpus)
        self._say(f"Ray: {where}; {'GPUs' if use_gpus else 'CPUs only'}; run folder {self.run_dir}")
        (self.run_dir / "config.yaml").write_text(dump_config(c), encoding="utf-8")
        self.placement = plan(
            use_gpus=use_gpus,
            engines=c.rollout.num_engines,
            tensor_parallel_size=c.rollout.tensor_parallel_size,
            ranks=c.learner.num_ranks,
            cpus_per_engine=c.rollout.cpus_per_engine,
            cpus_per_rank=c.learner.cpus_per_rank,
            engine_resources=c.rollout.resources,
            learner_resources=c.learner.resources,
        )
        started = time.perf_counter()
        self.engines = [self._new_engine(i) for i in range(len(self.placement.engine_options))]
        learner_model = self.resume_from or c.model_path
        self.learner = LearnerGroup(learner_settings(c, self.total_steps, learner_model), self.placement.learner_options)
        engine_info = ray.get([e.info.remote() for e in self.engines])
        self.pool = EnginePool(self.engines)
        placement = {"engines": engine_info, "learner_ranks": self.learner.setup_info}
        (self.run_dir / "placement.json").write_text(json.dumps(placement, indent=2, default=str) + "\n")
        backend = c.sync.backend if c.sync.backend != "auto" else ("nccl" if use_gpus else "gloo")
        self.sync = WeightSync(
            self.learner,
            self.pool,
            backend=backend,
            bucket_bytes=int(c.sync.bucket_mb * 2**20),
            tensor_parallel_size=c.rollout.tensor_parallel_size,
            timeout_s=c.sync.timeout_s,
        )
        self._say(
            f"{len(self.engines)} rollout engine(s), {c.learner.num_ranks} learner rank(s) (ZeRO-{c.learner.zero_stage}) "
            f"up in {time.perf_counter() - started:.0f} s; {self.total_steps} steps of "
            f"{c.grpo.questions_per_step} questions × {c.grpo.group_size}"
        )
        if self.resume_from is not None:
            state = ckpt.read_run_state(self.resume_from)
            self.learner.load_train_state(str(self.resume_from))
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            for name in ("metrics.jsonl", "questions.jsonl"):
                truncate_jsonl(self.run_dir / name, self.step)  # drop steps done after that checkpoint
            self._say(f"resumed from {self.resume_from} at step {self.step}")

    def _new_engine(self, index: int) -> Any:
        assert self.placement is not None
        options = self.placement.engine_options[index]
        return ray.remote(RolloutEngine).options(**options).remote(engine_settings(self.config), index)

    def _restart_engines(self, dead: list[int], why: str) -> None:
        """Replace dead engines in their placement bundles, rebuild the sync group, push the
        current weights; a configured limit ends the run instead of looping."""
        assert self.pool is not None and self.sync is not None
        limit = self.config.faults.max_engine_restarts
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
        self.sync.push()

    # ------------------------------------------------------------------ the loop
    def _submit(self, step: int) -> Batch:
        assert self.pool is not None
        indices = self.sampler.next(self.config.grpo.questions_per_step)
        records = [self.train_records[i] for i in indices]
        batch = Batch(step=step, indices=indices, records=records, submitted_at=time.perf_counter())
        batch.pending = self.pool.submit(
            records,
            self.config.grpo.group_size,
            sampling_settings(self.config, seed=self.config.seed),
            salt=step,
        )
        return batch

    def _collect(self, batch: Batch) -> None:
        """The batch's results; questions of an engine that died are generated again (same seeds)
        on the restarted engine, so none is lost or counted twice."""
        assert self.pool is not None and batch.pending is not None
        results, dead = self.pool.collect_partial(batch.pending)
        while dead:
            self._restart_engines(dead, f"during the rollout of step {batch.step}")
            lost = [i for i, r in enumerate(results) if r is None]
            retry = self.pool.submit(
                [batch.records[i] for i in lost],
                self.config.grpo.group_size,
                sampling_settings(self.config, seed=self.config.seed),
                salt=batch.step,
            )
            part, dead = self.pool.collect_partial(retry)
            for i, result in zip(lost, part, strict=True):
                results[i] = result
        batch.results = [r for r in results if r is not None]
        batch.rollout_seconds = time.perf_counter() - batch.submitted_at
        batch.pending = None

    def _push(self) -> float:
        assert self.sync is not None and self.pool is not None
        started = time.perf_counter()
        try:
            self.sync.push()
        except (ray.exceptions.RayActorError, TimeoutError, RuntimeError) as exc:
            if isinstance(exc, LearnerDied):
                raise
            dead = [i for i, ok in enumerate(self.pool.alive()) if not ok]
            if not dead:
                raise
            self._restart_engines(dead, "during a weight push")
        return time.perf_counter() - started

    def run(self) -> dict[str, Any]:
        if self.learner is None:
            self.start()
        c = self.config
        sync_seconds = self._push()  # once at start (and after a resume)
        start_eval: dict[str, float] | None = None
        if c.eval.at_start and self.step == 0 and self.valid_records:
            start_eval = self._evaluate("start")  # before the progress bar
        logger = MetricsLogger(self.run_dir, total_steps=self.total_steps, start_step=self.step, console=self.console)
        last: dict[str, float] = {}
        end = self.total_steps if self.stop_after is None else min(self.total_steps, self.step + self.stop_after)
        try:
            pending: Batch | None = None
            while self.step < end:
                step = self.step + 1
                step_started = time.perf_counter()
                if pending is None:
                    batch = self._submit(step)
                    self._collect(batch)
                else:
                    batch, pending = pending, None
                self._record_questions(batch)
                if c.grpo.off_policy and step < end:
                    pending = self._submit(step + 1)  # rolls out on the current weights while we learn
                values = self._learn(batch)
                self._check_skipped(values, step)
                self._check_signal(values, step, logger)
                if pending is not None:
                    self._collect(pending)  # engines finish the next rollout before new weights arrive
                sync_seconds = 0.0
                if step % c.sync.every == 0 or step == self.total_steps:
                    sync_seconds = self._push()
                self.step = step
                values["timing/weight_sync_s"] = sync_seconds
                values["timing/step_s"] = time.perf_counter() - step_started
                values["data/epoch"] = self.sampler.state.epoch + self.sampler.state.position / self.sampler.size
                values["data/bad_records"] = float(len(self.bad_records))
                if c.eval.every and step % c.eval.every == 0 and self.valid_records:
                    values.update(self._evaluate())
                logger.log(step, values)
                last = values
                if c.checkpoint.every and step % c.checkpoint.every == 0 and step != end:
                    try:
                        self._checkpoint()
                    except OSError as exc:  # disk full, quota: the previous checkpoint stays whole
                        self.checkpoint_failures += 1
                        logger.note(
                            f"[echoink] checkpoint at step {step} failed ({exc}); keeping "
                            f"{ckpt.latest_checkpoint(self.run_dir)}; training continues"
                        )
            finished = self.step >= self.total_steps
            final = self._checkpoint() if (c.checkpoint.at_end or not finished) else None
            logger.close()
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
            elif c.eval.at_end and self.valid_records:
                summary["eval"] = self._evaluate("final")
                if start_eval is not None:
                    summary["eval_gain"] = self._compare_start_end()
            if start_eval is not None:
                summary["eval_start"] = start_eval
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            return summary
        finally:
            logger.close()

    def _check_signal(self, values: dict[str, float], step: int, logger: MetricsLogger) -> None:
        """Say so when GRPO has nothing to learn from: with equal rewards in every group each
        advantage is 0 and only the KL term moves the weights (all solved, or all failed)."""
        flat = values.get("reward/zero_advantage_groups", 0.0) >= 1.0
        self.no_signal_steps = self.no_signal_steps + 1 if flat else 0
        values["reward/no_signal_steps"] = float(self.no_signal_steps)
        limit = self.config.grpo.warn_no_signal_steps
        if limit and self.no_signal_steps == limit:
            logger.note(
                f"[echoink] steps {step - limit + 1}-{step}: every question's {self.config.grpo.group_size} "
                f"completions got the same reward (accuracy {values.get('reward/accuracy', float('nan')):.2f}, "
                f"format {values.get('reward/format', float('nan')):.2f}), so every advantage is 0 and GRPO "
                f"learns nothing. All failed: check the rewards and the prompt, or warm start the model "
                f"(echoink model warmstart); all solved: harder data or a larger grpo.group_size."
            )

    def _check_skipped(self, values: dict[str, float], step: int) -> None:
        if values.get("learner/step_skipped", 0.0) > 0:
            self.skipped_steps += 1
            limit = self.config.faults.max_nonfinite_steps
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

    def _learn(self, batch: Batch) -> dict[str, float]:
        assert self.learner is not None
        c = self.config
        reward_started = time.perf_counter()
        experiences: list[Experience] = []
        group_ids: list[str] = []
        totals: list[float] = []
        components: dict[str, list[float]] = {name: [] for name in self.rewards.weights}
        lengths: list[int] = []
        truncated = 0
        reward_errors = 0
        generated = 0
        failed = 0
        for slot, (record, result) in enumerate(zip(batch.records, batch.results, strict=True)):
            if not result.ok:
                failed += 1
                entry = {"split": "train", "stage": "rollout", "step": batch.step, "id": record.id,
                         "file": record.source_file, "index": record.index, "error": result.error}
                if not c.data.skip_bad_records:
                    raise RuntimeError(
                        f"step {batch.step}: question {record.id!r} ({record.source_file}, record {record.index}) "
                        f"failed in rollout: {result.error} (set data.skip_bad_records: true to skip such records)"
                    )
                self._bad(entry)
                continue
            for completion in result.completions:
                scored = self.rewards.score(completion.text, record)
                reward_errors += len(scored.errors)
                totals.append(scored.total)
                for name, value in scored.components.items():
                    components[name].append(value)
                group_ids.append(f"{slot}:{record.id}")
                lengths.append(len(completion.token_ids))
                generated += len(completion.token_ids)
                truncated += completion.finish_reason == "length"
                experiences.append(Experience(record, completion.token_ids, 0.0, completion.logprobs))
        if not experiences:
            raise RuntimeError(f"step {batch.step}: every question of the batch failed in rollout")
        rewards = torch.tensor(totals, dtype=torch.float64)
        advantages = group_advantages_by_id(rewards, group_ids, eps=c.grpo.adv_eps)
        for exp, adv in zip(experiences, advantages.tolist(), strict=True):
            exp.advantage = float(adv)
        reward_seconds = time.perf_counter() - reward_started
        grouped = rewards.view(-1, c.grpo.group_size) if rewards.numel() % c.grpo.group_size == 0 else None
        metrics = self.learner.train_step(experiences)
        values: dict[str, float] = {
            "reward/total": float(rewards.mean()),
            **{f"reward/{name}": float(np.mean(v)) for name, v in components.items()},
            "reward/errors": float(reward_errors),
            "completion_length/mean": float(np.mean(lengths)),
            "completion_length/max": float(np.max(lengths)),
            "completion_length/clipped_ratio": truncated / len(lengths),
            "kl": metrics["kl"],
            "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"],
            "lr": metrics["lr"],
            "clip_fraction": metrics["clip_fraction"],
            "logprob_mean": metrics["logprob_mean"],
            "timing/rollout_s": batch.rollout_seconds,
            "timing/reward_s": reward_seconds,
            "timing/learn_s": metrics["learn_seconds"],
            "throughput/rollout_tokens_per_s": generated / max(batch.rollout_seconds, 1e-9),
            "throughput/learner_tokens_per_s": metrics["input_tokens"] / max(metrics["learn_seconds"], 1e-9),
            "rollout/failed_questions": float(failed),
            "learner/nonfinite_loss": metrics["nonfinite_loss"],
            "learner/step_skipped": metrics["skipped"],
            "data/completions": metrics["sequences"],
        }
        if grouped is not None:
            values["reward/group_std"] = float(grouped.std(dim=1).mean())
            values["reward/zero_advantage_groups"] = float((grouped.std(dim=1) == 0).float().mean())
        for key in ("mismatch/token_prob_error", "mismatch/logprob_abs_error", "memory/learner_peak_gb"):
            if key in metrics:
                values[key] = metrics[key]
        return values

    # ------------------------------------------------------------------ checkpoints & eval
    def _checkpoint(self) -> Path:
        assert self.learner is not None
        state = {
            "step": self.step,
            "sampler": self.sampler.state_dict(),
            "total_steps": self.total_steps,
            "config": self.config.model_dump(mode="json"),
            "time": time.time(),
        }

        def verify(folder: Path) -> None:
            if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
                raise RuntimeError(f"checkpoint {folder} is incomplete")

        path = ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            lambda tmp: self.learner.save(str(tmp), {"step": self.step}),  # type: ignore[union-attr]
            state,
            keep_last=self.config.checkpoint.keep_last,
            verify=verify,
        )
        self._say(f"checkpoint: {path}")
        return path

    def _compare_start_end(self) -> dict[str, Any]:
        """Paired before/after on the same questions: the gain and McNemar's test of it."""
        from orchestrator.evalrun import compare, compare_table

        result = compare(self.run_dir / "eval" / "start", self.run_dir / "eval" / "final")
        self._say("before (A) and after (B) training, greedy, same questions:\n" + compare_table(result))
        return {
            "accuracy_start": result["accuracy_a"],
            "accuracy_end": result["accuracy_b"],
            "questions": result["questions"],
            "wins": result["a_wrong_b_right"],
            "losses": result["a_right_b_wrong"],
            "mcnemar_p": result["mcnemar"]["p_value"],
        }

    def _evaluate(self, name: str | None = None) -> dict[str, float]:
        """``name`` None: the periodic check (the first ``eval.subset`` questions, no ablations) into
        eval/step-N; else the whole split with every ablation into eval/NAME, printed."""
        from orchestrator.evaluate import EvalSettings, evaluate_records

        assert self.pool is not None
        c = self.config
        settings = EvalSettings.from_config(c)
        records = self.valid_records
        if name is None:
            records, settings = records[: c.eval.subset], settings.only_plain()
        folder = self.run_dir / "eval" / (name or f"step-{self.step:06d}")
        result = evaluate_records(self.pool, records, settings, out_dir=folder, checkpoint=str(self.run_dir))
        if name is not None:
            which = "starting" if name == "start" else "final"
            self._say(f"evaluation of the {which} weights ({folder}):\n" + result.table())
        return {f"eval/{k}": v for k, v in result.flat_metrics().items()}

    def shutdown(self) -> None:
        if self.learner is not None:
            self.learner.kill()
        for engine in self.engines:
            ray.kill(engine)
        if self.placement is not None:
            self.placement.remove()


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the rows of steps up to ``max_step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def train(
    config: RunConfig, *, resume: bool = False, console: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Run to the end; a learner rank that dies restarts the run from the last checkpoint up to
    ``faults.max_restarts`` times, else the run stops saying how to resume."""
    attempt = 0
    while True:
        trainer = Trainer(config, resume=resume or attempt > 0, console=console, stop_after=stop_after)
        try:
            trainer.start()
            summary = trainer.run()
            summary["restarts"] = attempt
            return summary
        except LearnerDied as exc:
            run_dir = Path(config.output_dir)
            if attempt >= config.faults.max_restarts:
                raise RuntimeError(
                    f"{exc}. The run stopped at step {trainer.step}; {ckpt.last_checkpoint_words(run_dir)}. "
                    f"Continue with: echoink train --config <this config> --resume "
                    f"(or set faults.max_restarts to restart automatically)"
                ) from exc
            attempt += 1
            trainer._say(
                f"{exc}; restarting from {ckpt.latest_checkpoint(run_dir) or 'the start'} ({attempt}/{config.faults.max_restarts})"
            )
        finally:
            trainer.shutdown()
