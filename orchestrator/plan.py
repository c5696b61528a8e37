"""The start of a run as one pure plan: the run config and what is known of the cluster and the data
→ `RunPlan`, the placement, each role's settings, the schedule, every check and every warning.

Nothing here starts an actor, reads a file or asks Ray: the plan is computed (and can be printed,
`echoink plan`) before anything starts, and the trainer starts its actors from it without going
back to the config. A config that cannot run fails here, naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import avqa
from evaluation.evaluate import EvalSettings
from learner.types import LearnerSettings
from omni.inputs import MediaSettings
from omni.sizes import ModelShape
from orchestrator.config import RunConfig, check_colocation
from orchestrator.memory import MemoryPlan, check_fits
from orchestrator.placement import Layout, check_capacity, run_name, split_gpus
from orchestrator.scoring import ScoringRules
from orchestrator.settings import (
    engine_settings,
    eval_settings,
    learner_settings,
    media_settings,
    sampling_settings,
    scoring_rules,
)
from rollout.types import EngineSettings, SamplingSettings


@dataclass(frozen=True)
class Cluster:
    """What a plan needs to know of the cluster: whether the run uses GPUs, and how many there are."""

    use_gpus: bool
    gpus: int = 0
    gpu_memory_gib: float | None = None  # each GPU's (None: unknown, the memory check is skipped)
    host_memory_gib: float | None = None  # a node's


def cluster_of(use_gpus: str, gpus: int, gpu_memory_gib: float | None = None,
               host_memory_gib: float | None = None) -> Cluster:
    """``ray.use_gpus`` (auto | yes | no) against the cluster's ``gpus``."""
    if use_gpus == "yes" and gpus < 1:
        raise RuntimeError("ray.use_gpus is 'yes' but the Ray cluster has no GPUs")
    return Cluster(use_gpus=gpus >= 1 if use_gpus == "auto" else use_gpus == "yes", gpus=gpus,
                   gpu_memory_gib=gpu_memory_gib, host_memory_gib=host_memory_gib)


@dataclass(frozen=True)
class SyncPlan:
    """How weights reach the engines (`orchestrator.weight_sync.WeightSync`)."""

    backend: str  # nccl | gloo
    transport: str  # broadcast (split) | handoff (colocated: IPC / shared memory)
    bucket_bytes: int
    tensor_parallel_size: int
    timeout_s: float
    every: int  # push every N optimizer steps (and after the last)


@dataclass(frozen=True)
class Schedule:
    """The step loop's numbers: how many steps of what, and when to evaluate, save and give up."""

    total_steps: int
    stop_after: int | None  # --stop-after-steps: steps this call runs at most
    questions_per_step: int
    group_size: int
    off_policy: bool
    dynamic_sampling: bool
    max_extra_rollouts: int
    warn_no_signal_steps: int
    shuffle: bool
    eval_every: int
    eval_subset: int
    eval_at_start: bool
    eval_at_end: bool
    checkpoint_every: int
    keep_last: int
    checkpoint_at_end: bool
    samples_every: int
    samples_per_step: int
    max_engine_restarts: int
    max_restarts: int
    max_nonfinite_steps: int


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    model_path: Path  # the run's starting model
    resume_from: Path | None  # the checkpoint the policy continues from (--resume, a restart)
    needs_weights: bool  # False: random weights from config.json on both sides (benchmarks)
    seed: int
    layout: Layout
    engine: EngineSettings
    learner: LearnerSettings
    sampling: SamplingSettings
    scoring: ScoringRules
    reward_weights: dict[str, float]
    reward_options: dict[str, Any]
    media: MediaSettings
    eval: EvalSettings
    sync: SyncPlan
    schedule: Schedule
    warnings: tuple[str, ...] = ()
    memory: MemoryPlan | None = None  # on GPUs, with the model's shape known (orchestrator.memory)
    config_record: dict[str, Any] = field(default_factory=dict, compare=False)  # config.yaml, run_state.json

    def describe(self) -> str:
        """The plan as a person reads it: what this run will do, before it does it."""
        lo, s, lr, sa = self.layout, self.schedule, self.learner, self.sampling
        policy = "one step off policy" if s.off_policy else "on policy"
        correction = f", correction {lr.rollout_correction}" if lr.rollout_correction != "auto" else ""
        rows = [
            ("run folder", str(self.run_dir)),
            ("model", str(self.model_path) + (f" (policy resumes from {self.resume_from})" if self.resume_from else "")),
            ("placement", f"{lo.mode} ({lo.why}): {lo.engines} engine(s) × TP {lo.tensor_parallel_size}, "
                          f"{lo.ranks} learner rank(s); {'GPUs ' + str(lo.gpus_needed) if lo.use_gpus else 'CPUs only'}"),
            ("steps", f"{s.total_steps} of {s.questions_per_step} questions × {s.group_size} completions, {policy}"
                      + (f"; this call stops after {s.stop_after}" if s.stop_after is not None else "")),
            ("rollout", f"temperature {sa.temperature:g}, top-p {sa.top_p:g}, top-k {sa.top_k}, "
                        f"{sa.max_new_tokens} new tokens; max_model_len {self.engine.max_model_len}; media "
                        + ", ".join(f"{m} {n}" for m, n in self.engine.media_per_prompt)),
            ("learner", f"ZeRO-{lr.zero_stage}, {lr.dtype}, micro-batch {lr.micro_batch_size}, lr {lr.lr:g} "
                        f"{lr.lr_schedule}, beta {lr.beta:g}, loss {lr.policy_loss}/{lr.loss_agg}{correction}"
                        + (f", LoRA rank {lr.lora.rank} alpha {lr.lora.alpha:g} on {', '.join(lr.lora.targets)}"
                           + (" (towers too)" if lr.lora.towers else "") + ", reference = adapters off"
                           if lr.lora.enabled else "")
                        + (", shared prompts" if lr.share_prompts else "")
                        + (", gradient checkpointing" if lr.gradient_checkpointing else "")),
            ("rewards", ", ".join(f"{k} × {v:g}" for k, v in self.reward_weights.items())
                        + f"; advantage {self.scoring.advantage}"),
            ("weight sync", f"{self.sync.backend} {self.sync.transport} every {self.sync.every} step(s), "
                            f"{self.sync.bucket_bytes / 2**20:g} MiB buckets"),
            ("evaluation", f"protocol {self.eval.protocol} {self.eval.mode}; "
                           + ", ".join(w for w, on in (("at start", s.eval_at_start), ("at end", s.eval_at_end),
                                                       (f"every {s.eval_every} steps on {s.eval_subset}", s.eval_every))
                                       if on) or "none"),
            ("checkpoints", f"every {s.checkpoint_every or '—'} step(s), last {s.keep_last} kept"
                            + (", at the end" if s.checkpoint_at_end else "")),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines += [f"{'warning'.ljust(width)}  {w}" for w in self.warnings]
        if self.memory is not None:
            lines += ["memory (GiB; orchestrator/memory.py, held against RESULTS.md's measured peaks):",
                      *("  " + line for line in self.memory.describe().splitlines())]
        return "\n".join(lines)


def needs_weights(config: RunConfig) -> bool:
    """Whether the run reads weights from ``model_path`` (False: random weights from its config.json
    on both sides, the benchmarks' rows)."""
    return not (config.learner.random_init and config.rollout.load_format == "dummy")


def decide_mode(setting: str, cluster: Cluster, engines: int, tp: int, ranks: int) -> tuple[str, str]:
    """The placement mode and why: ``auto`` splits where the cluster's GPUs hold the split layout."""
    if setting != "auto":
        return setting, f"placement.mode is {setting}"
    if not cluster.use_gpus:
        return "split", "no GPUs: the roles share the CPUs either way"
    need = split_gpus(engines, tp, ranks)
    if need <= cluster.gpus:
        return "split", f"the split layout needs {need} GPUs and the cluster has {cluster.gpus}"
    return "colocated", (f"the split layout needs {need} GPUs but the cluster has {cluster.gpus}: "
                         "engines share the learner's GPUs")


def layout_for(config: RunConfig, cluster: Cluster, *, learner: bool = True) -> Layout:
    """Where the run's engines and (unless ``learner`` is False: evaluation) learner ranks go."""
    r, lc = config.rollout, config.learner
    ranks = lc.num_ranks if learner else 0
    mode, why = decide_mode(config.placement.mode if learner else "split", cluster, r.num_engines,
                            r.tensor_parallel_size, ranks)
    if mode == "colocated":
        check_colocation(config)
    layout = Layout(
        use_gpus=cluster.use_gpus, engines=r.num_engines, tensor_parallel_size=r.tensor_parallel_size, ranks=ranks,
        cpus_per_engine=r.cpus_per_engine, cpus_per_rank=lc.cpus_per_rank, engine_resources=dict(r.resources),
        learner_resources=dict(lc.resources), mode=mode, why=why, label=run_name(config.output_dir),
        engine_role="engine" if learner else "eval-engine",
    )
    check_capacity(layout, cluster.gpus)
    return layout


def check_family(config: RunConfig) -> None:
    """What the checkpoint's model family cannot do, refused before any actor starts (a folder
    without config.json is left to the loaders, which name what is missing)."""
    from omni.family import family_of

    folder = Path(config.model_path)
    if config.learner.router_aux_loss_coef > 0 and (folder / "config.json").is_file():
        family = family_of(folder)
        if not family.moe:
            raise ValueError(
                f"learner.router_aux_loss_coef is {config.learner.router_aux_loss_coef:g}, but {folder} is a "
                f"{family.title} thinker, whose language model has no experts to balance: set it to 0"
            )


def ray_cpus(config: RunConfig) -> float:
    """The logical CPUs a training run's actors ask for (a local Ray is started with at least these)."""
    return config.rollout.num_engines * config.rollout.cpus_per_engine + config.learner.num_ranks * config.learner.cpus_per_rank


def make_plan(
    config: RunConfig,
    cluster: Cluster,
    *,
    train_size: int,
    records: Sequence[avqa.Record] | None = None,
    resume_from: Path | None = None,
    stop_after: int | None = None,
    shape: ModelShape | None = None,
) -> RunPlan:
    """The plan of a training run over ``train_size`` questions; ``records`` (the run's splits)
    decide the engines' media with ``media.per_prompt: auto``. ``config``'s paths are taken as
    they are (`orchestrator.paths.with_absolute_paths` first, for a run). With the thinker's
    ``shape`` on GPUs the plan holds its memory estimate, and a run that cannot fit the cluster's
    GPU or host memory (where known) fails here, naming its largest item and a lever."""
    c, g = config, config.grpo
    layout = layout_for(c, cluster)
    check_family(c)
    total_steps = c.steps_for(train_size)
    sleeps = layout.engines_sleep
    schedule = Schedule(
        total_steps=total_steps, stop_after=stop_after, questions_per_step=g.questions_per_step,
        group_size=g.group_size, off_policy=g.off_policy, dynamic_sampling=g.dynamic_sampling,
        max_extra_rollouts=g.max_extra_rollouts, warn_no_signal_steps=g.warn_no_signal_steps,
        shuffle=c.data.shuffle, eval_every=c.eval.every, eval_subset=c.eval.subset, eval_at_start=c.eval.at_start,
        eval_at_end=c.eval.at_end, checkpoint_every=c.checkpoint.every, keep_last=c.checkpoint.keep_last,
        checkpoint_at_end=c.checkpoint.at_end, samples_every=c.log.samples_every,
        samples_per_step=c.log.samples_per_step, max_engine_restarts=c.faults.max_engine_restarts,
        max_restarts=c.faults.max_restarts, max_nonfinite_steps=c.faults.max_nonfinite_steps,
    )
    sync = SyncPlan(
        backend=c.sync.backend if c.sync.backend != "auto" else ("nccl" if cluster.use_gpus else "gloo"),
        transport="handoff" if layout.mode == "colocated" else "broadcast",
        bucket_bytes=int(c.sync.bucket_mb * 2**20), tensor_parallel_size=c.rollout.tensor_parallel_size,
        timeout_s=c.sync.timeout_s, every=c.sync.every,
    )
    memory = None
    if shape is not None and cluster.use_gpus:
        memory = check_fits(c, shape, colocated=layout.mode == "colocated", gpu_gib=cluster.gpu_memory_gib,
                            host_gib=cluster.host_memory_gib)
    return RunPlan(
        memory=memory,
        run_dir=Path(c.output_dir),
        model_path=Path(c.model_path),
        resume_from=resume_from,
        needs_weights=needs_weights(c),
        seed=c.seed,
        layout=layout,
        engine=engine_settings(c, sleep_mode=sleeps, records=records),
        # the run's starting model, whatever the policy resumes from: the reference is built from it
        # (the KL is measured against the starting model after every resume), and a checkpoint's
        # folder copies its files (never a checkpoint that pruning may delete); a resumed policy's
        # weights come from the checkpoint's train state
        learner=learner_settings(c, total_steps, c.model_path, release_memory=sleeps),
        sampling=sampling_settings(c),
        scoring=scoring_rules(c),
        reward_weights=dict(c.rewards.weights),
        reward_options={"lenient": c.rewards.lenient, "accuracy_match": c.rewards.accuracy_match},
        media=media_settings(c),
        eval=eval_settings(c),
        sync=sync,
        schedule=schedule,
        warnings=tuple(config_warnings(c)),
        config_record=c.model_dump(mode="json"),
    )


def config_warnings(config: RunConfig) -> list[str]:
    """Settings that run but waste the hardware, one sentence each naming the keys to change.

    Warnings, not errors: the run is correct, only slower than it needs to be. The trainer prints
    them with the plan when it starts.
    """
    out: list[str] = []
    lc = config.learner
    if lc.zero_stage == 3 and lc.num_ranks == 1:
        # one rank holds every partition, so nothing is saved, yet every module's forward and
        # backward still passes ZeRO-3's fetch/release hooks (RESULTS.md 3, 3b: slower than ZeRO-2)
        out.append(
            "learner.zero_stage is 3 with learner.num_ranks 1: ZeRO-3 partitions nothing on one rank and still "
            "costs a gather/release hook per module in every forward and backward; set learner.zero_stage: 2 "
            "(or learner.num_ranks above 1)"
        )
    if lc.optimizer_dtype == "bfloat16" and lc.lr < 1e-4:
        # measured (RESULTS.md section 10): an update of lr changes 2 % of bf16 weights of std 0.02
        # at lr 1e-6, 16 % at 1e-5, all of them at 5e-4
        out.append(
            f"learner.optimizer_dtype is bfloat16 with learner.lr {lc.lr:g}: bf16 master weights round away most "
            "updates that small (at 1e-6 only about 2 % of typical weights change); use float32 states "
            "(learner.offload_optimizer, more host memory) or LoRA (learner.lora.rank) for an exact update"
        )
    return out
