"""`echoink eval` as a job of the driver: engines for any checkpoint, placed from the run config,
scoring a split through `evaluation.evaluate` (what is scored and how lives there)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from avqa import LoadReport, load_records
from evaluation.evaluate import CONDITIONS, EvalResult, EvalSettings, evaluate_records
from omni.names import require_safetensors
from orchestrator.config import RunConfig
from orchestrator.paths import with_absolute_paths
from orchestrator.placement import cluster_gpus, place
from orchestrator.plan import cluster_of, layout_for
from orchestrator.ray_connect import connect
from orchestrator.settings import engine_settings, eval_settings
from orchestrator.teardown import end_actors
from rollout.engine import RolloutEngine
from rollout.pool import EnginePool


def run_eval(
    config: RunConfig,
    checkpoint: Path,
    *,
    split: str = "valid",
    mode: str | None = None,
    samples: int | None = None,
    ablate: list[str] | None = None,
    limit: int | None = None,
    out_dir: Path | None = None,
    protocol: str | None = None,
    token_limit: int | None = None,
) -> EvalResult:
    """Score ``checkpoint`` on a split under a protocol (default ``eval.protocol``); ``token_limit``
    replaces a paper protocol's own limit (rehearsals: summary.json records the limit used)."""
    [result] = run_evals(
        config,
        checkpoint,
        [(protocol, out_dir)],
        split=split,
        mode=mode,
        samples=samples,
        ablate=ablate,
        limit=limit,
        token_limit=token_limit,
    )
    return result


def run_evals(
    config: RunConfig,
    checkpoint: Path,
    runs: Sequence[tuple[str | None, Path | None]],
    *,
    split: str = "valid",
    mode: str | None = None,
    samples: int | None = None,
    ablate: list[str] | None = None,
    limit: int | None = None,
    token_limit: int | None = None,
) -> list[EvalResult]:
    """Several evaluations of one checkpoint on the same engines, one per (protocol, out_dir) of
    ``runs`` (None: ``eval.protocol``; the default folder ``CHECKPOINT/eval-SPLIT-NAME``)."""
    config, checkpoint = with_absolute_paths(config, must_exist=()), Path(checkpoint).absolute()
    require_safetensors(checkpoint)
    path = {"valid": config.data.valid, "train": config.data.train}.get(split)
    if path is None:
        raise ValueError(f"no {split!r} split in the config (data.valid / data.train)")
    report = LoadReport() if config.data.skip_bad_records else None
    records = load_records(path, media_root=config.data.media_root, report=report)
    if limit is not None:
        records = records[:limit]
    for condition in ablate or []:
        if condition not in CONDITIONS:
            raise ValueError(f"--ablate: unknown condition {condition!r}; choose from {', '.join(CONDITIONS)}")
    overrides: dict[str, Any] = {}
    if mode is not None:
        overrides["mode"] = mode
    if samples is not None:
        overrides["samples"] = samples
    if ablate:
        overrides["ablate"] = tuple(ablate)
    if token_limit is not None:
        overrides["token_limit"] = token_limit
    planned: list[tuple[EvalSettings, Path]] = []
    for protocol, out_dir in runs:
        settings = eval_settings(config, **overrides, **({"protocol": protocol} if protocol is not None else {}))
        limit_tokens = settings.decoding().max_new_tokens
        if config.rollout.max_model_len <= limit_tokens:
            raise ValueError(
                f"rollout.max_model_len ({config.rollout.max_model_len}) leaves no room for a prompt beside the "
                f"{limit_tokens} new tokens of eval protocol {settings.protocol}: raise rollout.max_model_len"
            )
        name = settings.mode if settings.protocol == "fair" else settings.protocol
        planned.append((settings, out_dir or checkpoint / f"eval-{split}-{name}"))
    c = config
    connect(c.ray.address, c.ray.num_cpus, c.rollout.num_engines * c.rollout.cpus_per_engine)
    placement = place(layout_for(c, cluster_of(c.ray.use_gpus, cluster_gpus()), learner=False))
    engine_cls = ray.remote(RolloutEngine)
    engines = [
        engine_cls.options(**opts).remote(engine_settings(c, checkpoint, records=records), i)
        for i, opts in enumerate(placement.engine_options)
    ]
    results = []
    try:
        pool = EnginePool(engines)
        for settings, out in planned:
            results.append(
                evaluate_records(
                    pool, records, settings, out_dir=out, checkpoint=str(checkpoint), config=c.model_dump(mode="json")
                )
            )
    finally:
        end_actors(engines, f"evaluating {checkpoint}")  # returns once their GPUs are free
        placement.remove()
    if report is not None and report.skipped:
        for result in results:
            result.summary["skipped_records"] = [e.to_dict() for e in report.errors]
            (result.out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    return results
