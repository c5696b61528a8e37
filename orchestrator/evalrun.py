"""`echoink eval` and `echoink compare`: score any checkpoint on a split; compare two evaluations."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from avqa import LoadReport, Record, load_records
from omni.names import require_safetensors
from orchestrator.config import RunConfig, with_absolute_paths
from orchestrator.evalstats import mcnemar
from orchestrator.evaluate import CONDITIONS, EvalResult, EvalSettings, evaluate_records
from orchestrator.metrics import read_jsonl
from orchestrator.placement import decide_gpus, plan_run
from orchestrator.runtime import connect
from orchestrator.settings import engine_settings, eval_settings
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
    placement = plan_run(c, decide_gpus(c.ray.use_gpus), learner=False)
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
        for engine in engines:
            ray.kill(engine)
        placement.remove()
    if report is not None and report.skipped:
        for result in results:
            result.summary["skipped_records"] = [e.to_dict() for e in report.errors]
            (result.out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    return results


def read_results(folder: Path, condition: str = "none") -> dict[str, dict[str, Any]]:
    path = folder / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no results.jsonl (an `echoink eval` output folder?)")
    return {str(row["id"]): row for row in read_jsonl(path) if row.get("condition", "none") == condition}


def protocol_of(folder: Path) -> str:
    """The evaluation protocol a results folder was scored with (folders from before protocols
    existed were scored with the one protocol there was then: fair)."""
    path = folder / "summary.json"
    if not path.is_file():
        return "fair"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg})") from None
    protocol = summary.get("protocol", "fair")
    name = protocol.get("name") if isinstance(protocol, dict) else protocol
    if not isinstance(name, str):
        raise ValueError(f"{path}: field 'protocol' holds no protocol name: {protocol!r}")
    return name


def compare(a: Path, b: Path, condition: str = "none", *, allow_mixed_protocols: bool = False) -> dict[str, Any]:
    """Per-question wins and losses of B against A and McNemar's paired test. Results of different
    evaluation protocols are refused unless ``allow_mixed_protocols``: a difference between them
    would be the protocols' as much as the models'."""
    protocol_a, protocol_b = protocol_of(a), protocol_of(b)
    if protocol_a != protocol_b and not allow_mixed_protocols:
        raise ValueError(
            f"{a} was evaluated with protocol {protocol_a} and {b} with {protocol_b}: their difference would mix "
            "the models' with the protocols'. Evaluate both with one protocol (echoink eval --protocol …), or "
            "pass --allow-mixed-protocols to compare them anyway"
        )
    rows_a, rows_b = read_results(a, condition), read_results(b, condition)
    shared = sorted(set(rows_a) & set(rows_b))
    if not shared:
        raise ValueError(f"{a} and {b} share no question ids")
    right_a = {q: rows_a[q]["correct"] >= 0.5 for q in shared}
    right_b = {q: rows_b[q]["correct"] >= 0.5 for q in shared}
    only_a = [q for q in shared if right_a[q] and not right_b[q]]
    only_b = [q for q in shared if right_b[q] and not right_a[q]]
    both = sum(right_a[q] and right_b[q] for q in shared)
    neither = sum(not right_a[q] and not right_b[q] for q in shared)
    test = mcnemar(len(only_a), len(only_b))
    return {
        "a": str(a),
        "b": str(b),
        "protocol_a": protocol_a,
        "protocol_b": protocol_b,
        "questions": len(shared),
        "only_in_a": len(set(rows_a) - set(rows_b)),
        "only_in_b": len(set(rows_b) - set(rows_a)),
        "accuracy_a": sum(right_a.values()) / len(shared),
        "accuracy_b": sum(right_b.values()) / len(shared),
        "both_right": both,
        "both_wrong": neither,
        "a_right_b_wrong": len(only_a),
        "a_wrong_b_right": len(only_b),
        "b_wins": only_b,
        "b_losses": only_a,
        "mcnemar": test,
    }


def compare_table(result: dict[str, Any]) -> str:
    m = result["mcnemar"]
    return "\n".join(
        [
            f"A: {result['a']} (protocol {result.get('protocol_a', 'fair')})",
            f"B: {result['b']} (protocol {result.get('protocol_b', 'fair')})",
            f"questions compared: {result['questions']}"
            + (f" (ignored: {result['only_in_a']} only in A, {result['only_in_b']} only in B)"
               if result["only_in_a"] or result["only_in_b"] else ""),
            f"accuracy   A {result['accuracy_a']:.4f}   B {result['accuracy_b']:.4f}   "
            f"Δ {result['accuracy_b'] - result['accuracy_a']:+.4f}",
            f"both right {result['both_right']}, both wrong {result['both_wrong']}, "
            f"B wins {result['a_wrong_b_right']}, B loses {result['a_right_b_wrong']}",
            f"McNemar: exact p = {m['p_value']:.4g} (chi² {m['statistic']:.3f}, p = {m['p_value_chi2']:.4g})",
        ]
    )


def gain_summary(start: Path, end: Path) -> tuple[dict[str, Any], str]:
    """Paired before/after on the same questions (a run's ``eval/start`` and ``eval/final``): the
    gain and McNemar's test of it, for ``summary.json``, and the printed table."""
    result = compare(start, end)
    gain = {
        "accuracy_start": result["accuracy_a"],
        "accuracy_end": result["accuracy_b"],
        "questions": result["questions"],
        "wins": result["a_wrong_b_right"],
        "losses": result["a_right_b_wrong"],
        "mcnemar_p": result["mcnemar"]["p_value"],
    }
    return gain, compare_table(result)


def evaluate_in_run(
    pool: EnginePool,
    records: list[Record],
    config: RunConfig,
    run_dir: Path,
    step: int,
    name: str | None,
    say: Callable[[str], None],
) -> dict[str, float]:
    """An evaluation inside a training run, on its engines. ``name`` None: the periodic check (the
    first ``eval.subset`` questions, no ablations) into eval/step-N; else the whole split with every
    ablation into eval/NAME, printed. Returns the ``eval/*`` metrics."""
    settings = eval_settings(config)
    if name is None:
        records, settings = records[: config.eval.subset], settings.only_plain()
    folder = run_dir / "eval" / (name or f"step-{step:06d}")
    result = evaluate_records(pool, records, settings, out_dir=folder, checkpoint=str(run_dir))
    if name is not None:
        which = "starting" if name == "start" else "final"
        say(f"evaluation of the {which} weights ({folder}):\n" + result.table())
    return {f"eval/{k}": v for k, v in result.flat_metrics().items()}
