"""`echoink reproduce`: the EchoInk-R1 paper's two numbers from this code, and a fair comparison.

Stages, each leaving a marker that a second call finds (so a stopped or killed call continues where
it stopped):

1. ``data/{train,valid}/``: AVQA-R1-6K curated from OmniInstruct-v1 (``curate.json``: the counts,
   against the released 4,490 / 1,911);
2. ``eval/base-paper/``, ``eval/base-fair/``: the base model under the paper's ``paper-base``
   protocol and the ``fair`` one (``summary.json``);
3. ``train/``: GRPO with the reference config (configs/echoink_r1_7b.yaml), resumed from its newest
   checkpoint (``summary.json`` with ``finished: true``);
4. ``eval/trained-paper/``, ``eval/trained-fair/``: the trained model under ``paper-trained`` and
   ``fair``;
5. ``report.md``: our numbers beside the paper's (80.53 / 85.77), 95 % intervals, and the paired
   before/after test under each pairing.

``rehearse``: the same chain on a tiny random checkpoint and a synthetic OmniInstruct-like source,
a few steps on CPUs, with the paper protocols' token limit cut (the report says so).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.paper import EVALS, ReproductionFolders, write_report
from orchestrator.config import RunConfig, load_config
from orchestrator.paths import with_absolute_paths

REPO = Path(__file__).resolve().parent.parent
REFERENCE_CONFIG = REPO / "configs" / "echoink_r1_7b.yaml"
STATE = "reproduce.json"

# The rehearsal: the reference config cut to a CPU box (one engine, two ZeRO-2 ranks over gloo,
# 2 questions x G 4 a step, 2 steps), what `tests/test_train_e2e_cpu.py` runs.
REHEARSAL_OVERRIDES: tuple[str, ...] = (
    "total_steps=2",
    "grpo.group_size=4",
    "grpo.questions_per_step=2",
    "sampling.max_new_tokens=16",
    "rollout.num_engines=1",
    "rollout.max_model_len=1024",
    "rollout.enforce_eager=true",
    "rollout.cpus_per_engine=0.5",
    "learner.num_ranks=2",
    "learner.zero_stage=2",
    "learner.dtype=auto",
    "learner.micro_batch_size=4",
    "learner.lr=1e-4",
    "learner.gradient_checkpointing=false",
    "learner.cpus_per_rank=0.5",
    "sync.backend=gloo",
    "sync.bucket_mb=16",
    "checkpoint.every=0",
    "checkpoint.keep_last=1",
    "eval.ablate=[none]",
    "eval.every=0",
)
REHEARSAL_TOKEN_LIMIT = 24  # the paper protocols' 1024 new tokens, cut for a random tiny model on CPUs
REHEARSAL_SIZES = {"train": 8, "valid": 6}



@dataclass
class Reproduction(ReproductionFolders):
    model: Path
    source: str
    rehearse: bool
    config: RunConfig
    token_limit: int | None
    say: Callable[[str], None]


def reproduce(
    out: str | Path,
    *,
    model: str | Path | None = None,
    omniinstruct: str | None = None,
    rehearse: bool = False,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    stop_after_steps: int | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run (or continue) the reproduction into ``out``; returns what ``reproduce.json`` holds, with
    ``report`` (report.md's path) once every stage is done, or ``stopped`` when training stopped
    after ``stop_after_steps`` (call again to continue)."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    out.mkdir(parents=True, exist_ok=True)
    if rehearse:
        model, omniinstruct = _rehearsal_inputs(out, model, omniinstruct, say)
    if model is None or omniinstruct is None:
        raise ValueError("echoink reproduce needs --model and --omniinstruct (or --rehearse)")
    model = Path(os.path.abspath(Path(model).expanduser()))
    if not model.is_dir():
        raise FileNotFoundError(f"--model: {model} is not a checkpoint folder")
    source = str(omniinstruct)
    if Path(source).expanduser().exists():
        source = os.path.abspath(Path(source).expanduser())
    state = _check_state(out, model, source, rehearse, config_path, overrides)
    run = Reproduction(
        out=out,
        model=model,
        source=source,
        rehearse=rehearse,
        config=_config(out, model, rehearse, config_path, overrides),
        token_limit=REHEARSAL_TOKEN_LIMIT if rehearse else None,
        say=say,
    )
    _connect(run.config)
    state["counts"] = {split: _curate(run, split) for split in ("train", "valid")}
    _evaluate(run, "base", run.model)
    trained = _train(run, stop_after_steps)
    if trained is None:
        state["stopped"] = True
        _write_state(out, state)
        say(f"[reproduce] training stopped before its end: run the same command again to continue ({run.train_dir})")
        return state
    state.pop("stopped", None)
    _evaluate(run, "trained", trained)
    c = run.config
    report = write_report(run, model=run.model, trained=trained, rehearse=run.rehearse, token_limit=run.token_limit,
                          training={"rewards.accuracy_match": c.rewards.accuracy_match, "sampling.top_k": c.sampling.top_k,
                                    "sampling.max_new_tokens": c.sampling.max_new_tokens})
    state["report"] = str(report)
    _write_state(out, state)
    say(f"[reproduce] report: {report}")
    return state


# ---------------------------------------------------------------------------------- stages
def _rehearsal_inputs(
    out: Path, model: str | Path | None, source: str | None, say: Callable[[str], None]
) -> tuple[Path, str]:
    """The tiny checkpoint and the synthetic source a rehearsal uses where none is given."""
    from avqa.curate import write_synthetic_source

    folder = out / "rehearsal"
    if model is None:
        model = folder / "tiny-omni"
        if not (model / "config.json").is_file():
            from omni.fixtures.tiny import build_tiny_checkpoint

            say(f"[reproduce] rehearsal: a tiny random Qwen2.5-Omni in {model}")
            build_tiny_checkpoint(model, seed=0)
    if source is None:
        source = str(folder / "omniinstruct")
        if not (Path(source) / "data").is_dir():
            say(f"[reproduce] rehearsal: a synthetic OmniInstruct-like source in {source}")
            write_synthetic_source(source, **REHEARSAL_SIZES)
    return Path(model), str(source)


def _check_state(
    out: Path, model: Path, source: str, rehearse: bool, config_path: str | Path | None, overrides: Sequence[str]
) -> dict[str, Any]:
    """reproduce.json: the inputs of the reproduction in ``out``; another call must give the same."""
    inputs = {
        "model": str(model),
        "omniinstruct": source,
        "rehearse": rehearse,
        "config": str(Path(config_path).absolute()) if config_path else str(REFERENCE_CONFIG),
        "overrides": list(overrides),
    }
    path = out / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc.msg}); remove it to start this reproduction again") from None
        if state.get("inputs") != inputs:
            changed = sorted(k for k in inputs if state.get("inputs", {}).get(k) != inputs[k])
            raise ValueError(
                f"{out} holds a reproduction with other inputs ({', '.join(changed)} differ: see {path}); "
                "give the same ones to continue it, or another --out"
            )
        return state
    state = {"inputs": inputs}
    _write_state(out, state)
    return state


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / STATE)


def _config(
    out: Path, model: Path, rehearse: bool, config_path: str | Path | None, overrides: Sequence[str]
) -> RunConfig:
    """The reference config with this reproduction's model, data and run folder; the rehearsal's
    CPU settings; then the user's ``--set`` overrides."""
    data = out / "data"
    ours = [
        f"model_path={model}",
        f"output_dir={out / 'train'}",
        f"data.train={data / 'train' / 'omni_rl_format_train.json'}",
        f"data.valid={data / 'valid' / 'omni_rl_format_valid.json'}",
        "data.media_root=null",
        # the reproduction evaluates the start and the end itself, under both protocols
        "eval.at_start=false",
        "eval.at_end=false",
        "eval.protocol=fair",
    ]
    rehearsal = list(REHEARSAL_OVERRIDES) if rehearse else []
    config = load_config(config_path or REFERENCE_CONFIG, [*ours, *rehearsal, *overrides])
    return with_absolute_paths(config, must_exist=())


def _connect(config: RunConfig) -> None:
    """One Ray for every stage, with the logical CPUs the training needs."""
    from orchestrator.ray_connect import connect

    c = config
    connect(c.ray.address, c.ray.num_cpus, c.rollout.num_engines * c.rollout.cpus_per_engine + c.learner.num_ranks * c.learner.cpus_per_rank)


def _curate(run: Reproduction, split: str) -> dict[str, Any]:
    from avqa.curate import curate

    marker = run.data_dir / split / "curate.json"
    if marker.is_file():
        counts = json.loads(marker.read_text(encoding="utf-8"))
        run.say(f"[reproduce] data: {counts['check']} (curated before: {marker})")
        return counts
    run.say(f"[reproduce] data: curating the {split} split of {run.source}")
    _, report = curate(run.source, split, run.data_dir)
    counts = report.to_dict(split)
    if run.rehearse:
        counts["check"] += " (rehearsal: a synthetic source)"
    marker.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    run.say(f"[reproduce] data: {counts['check']}")
    return counts


def _evaluate(run: Reproduction, which: str, checkpoint: Path) -> None:
    """The evaluations of one model (``which``: base | trained) not done yet, on one set of engines."""
    from echoink.eval_job import run_evals

    todo = []
    for name, model, protocol in EVALS:
        if model != which:
            continue
        summary_path = run.eval_dir(name) / "summary.json"
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            if summary.get("protocol", {}).get("name") == protocol and summary.get("checkpoint") == str(checkpoint):
                run.say(f"[reproduce] {name}: done before ({summary_path}), accuracy {summary['accuracy']:.4f}")
                continue
        todo.append((name, protocol))
    if not todo:
        return
    run.say(f"[reproduce] evaluating {checkpoint} with protocol(s) {', '.join(p for _, p in todo)}")
    # token_limit (rehearsals) cuts the paper protocols' own limit; the fair one keeps sampling.max_new_tokens
    results = run_evals(
        run.config, checkpoint, [(protocol, run.eval_dir(name)) for name, protocol in todo], token_limit=run.token_limit
    )
    for (name, _), result in zip(todo, results, strict=True):
        run.say(f"[reproduce] {name}:\n{result.table()}")


def _train(run: Reproduction, stop_after_steps: int | None) -> Path | None:
    """The trained checkpoint, or None when training stopped before its last step."""
    from orchestrator.trainer import train

    summary_path = run.train_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("finished") and summary.get("checkpoint") and Path(summary["checkpoint"]).is_dir():
            run.say(f"[reproduce] train: done before ({summary['steps']} steps), checkpoint {summary['checkpoint']}")
            return Path(summary["checkpoint"])
    from orchestrator.checkpoint import latest_checkpoint

    resume = latest_checkpoint(run.train_dir) is not None
    run.say(f"[reproduce] train: GRPO into {run.train_dir}" + (" (resuming from its newest checkpoint)" if resume else ""))
    summary = train(run.config, resume=resume, stop_after=stop_after_steps)
    if not summary.get("finished"):
        return None
    if "checkpoint" not in summary:
        raise RuntimeError(f"{summary_path}: training finished without a final checkpoint (checkpoint.at_end false?)")
    return Path(summary["checkpoint"])
