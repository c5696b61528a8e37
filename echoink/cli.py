"""The `echoink` command. Each subcommand imports what it needs when it runs, so `--help` is fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


def _data_synth(args: argparse.Namespace) -> int:
    import dataclasses

    from avqa.synth import DEMO_SPEC, SynthSpec, synth_dataset

    given = {
        "image_size": args.image_size,
        "audio_seconds": args.audio_seconds,
        "colours": tuple(args.colours.split(",")) if args.colours else None,
        "tones": tuple(args.tones.split(",")) if args.tones else None,
        "shuffle_options": args.shuffle_options or None,
        "shape_scale": args.shape_scale,
    }
    base = DEMO_SPEC if args.demo else SynthSpec()
    spec = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
    mixing = {"types": tuple(args.types.split(","))} if args.types else {}
    if mixing and args.kind != "mixed":
        raise SystemExit("echoink data synth: --types chooses what --kind mixed mixes")
    paths = synth_dataset(args.out, train=args.train, val=args.val, seed=args.seed, spec=spec, kind=args.kind, **mixing)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _scale(text: str) -> tuple[float, float]:
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


def _data_avqa(args: argparse.Namespace) -> int:
    from avqa.curate import curate

    json_path, report = curate(args.source, args.split, args.out)
    print(report.summary())
    print(f"wrote {json_path}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from collections import Counter

    from avqa import LoadReport, MediaError, load_audio, load_image, load_records, load_video

    report = LoadReport()
    records = load_records(args.path, report=report)
    print(report.summary())
    letters = Counter(r.answer for r in records)
    print("gold letters: " + ", ".join(f"{k}={v}" for k, v in sorted(letters.items())))
    types = Counter(r.data_type for r in records)
    print("data types: " + ", ".join(f"{k}={v}" for k, v in sorted(types.items())))
    media_errors = 0
    for record in records[: args.media] if args.media >= 0 else records:
        try:
            if record.image_path is not None:
                load_image(record.image_path)
            if record.audio_path is not None:
                load_audio(record.audio_path)
            if record.video_path is not None:  # video_audio: its sound track too
                load_video(record.video_path, with_audio=record.data_type == "video_audio")
        except MediaError as exc:
            media_errors += 1
            print(f"  media: record {record.index} (id {record.id!r}): {exc}")
    checked = len(records) if args.media < 0 else min(args.media, len(records))
    print(f"media of {checked} records decoded, {media_errors} failed")
    return 1 if report.skipped or media_errors else 0


# The layouts of each family (omni.fixtures.tiny.LAYOUTS, omni.fixtures.tiny_qwen3.QWEN3_LAYOUTS), spelt
# out so that `--help` imports no model code (a test keeps them equal)
MODEL_LAYOUTS = {"qwen2_5_omni": ("tiny", "small", "2b", "3b", "7b"), "qwen3_omni": ("tiny", "30b-a3b")}


def _model_tiny(args: argparse.Namespace) -> int:
    if args.layout not in MODEL_LAYOUTS[args.family]:
        print(f"echoink model tiny: --layout {args.layout} is not a {args.family} layout; "
              f"its layouts: {', '.join(MODEL_LAYOUTS[args.family])}", file=sys.stderr)
        return 2
    if args.family == "qwen3_omni":
        from omni.fixtures.tiny_qwen3 import QWEN3_LAYOUTS, build_tiny_qwen3_checkpoint

        out = build_tiny_qwen3_checkpoint(args.out, seed=args.seed, sizes=QWEN3_LAYOUTS[args.layout],
                                          weights=not args.config_only)
    else:
        from omni.fixtures.tiny import LAYOUTS, build_tiny_checkpoint

        out = build_tiny_checkpoint(args.out, seed=args.seed, sizes=LAYOUTS[args.layout], weights=not args.config_only)
    what = "config-only (random weights at load time)" if args.config_only else "random weights"
    from omni.family import FAMILIES

    print(f"{FAMILIES[args.family].title} checkpoint, layout {args.layout}, {what}: {out}")
    return 0


def _model_warmstart(args: argparse.Namespace) -> int:
    from echoink.warmstart import warm_start

    summary = warm_start(
        args.model, args.data, args.out, steps=args.steps, batch=args.batch, lr=args.lr, ranks=args.ranks, seed=args.seed
    )
    print(
        f"warm start: {summary['steps']} steps in {summary['seconds']:.0f} s, NLL per token "
        f"{summary['nll_first']:.3f} → {summary['nll_last']:.3f}; checkpoint: {args.out}"
    )
    return 0


def _absolute_config(config: RunConfig, must_exist: tuple[str, ...] | None = None) -> RunConfig:
    """The path rule (`orchestrator.paths.with_absolute_paths`): every path key absolute against
    the directory this command was started in, before any actor sees the config; its warnings
    printed as one line each."""
    import warnings

    from orchestrator.paths import with_absolute_paths

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = with_absolute_paths(config, must_exist=must_exist)
    for warning in caught:
        print(f"echoink: warning: {warning.message}", file=sys.stderr)
    return config


def _absolute_arg(path: Path, option: str, *, must_exist: bool) -> Path:
    """A path option made absolute against the current directory, like the config's paths."""
    absolute = Path(os.path.abspath(path.expanduser()))
    if must_exist and not absolute.exists():
        raise FileNotFoundError(f"{option}: {str(path)!r} does not exist (tried {absolute})")
    return absolute


def _train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.trainer import train

    config = _absolute_config(load_config(args.config, args.set, recipe=args.recipe))
    summary = train(config, resume=args.resume, stop_after=args.stop_after_steps)
    run_dir = Path(summary["run_dir"])
    print(f"run folder:   {run_dir}")
    print(f"metrics:      {run_dir / 'metrics.jsonl'}")
    print(f"tensorboard:  tensorboard --logdir {run_dir / 'tensorboard'}")
    if "checkpoint" in summary:
        print(f"checkpoint:   {summary['checkpoint']}")
    if "eval" in summary:
        print(f"evaluation:   {run_dir / 'eval' / 'final' / 'summary.json'}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """What `echoink train` would do with this config on a cluster of ``--gpus`` GPUs, without
    starting anything: the plan it computes before its first actor."""
    from orchestrator.config import load_config
    from orchestrator.data import load_run_data
    from orchestrator.plan import cluster_of, make_plan

    if args.gpus < 0 or (args.questions is not None and args.questions < 1):
        raise ValueError("--gpus must be 0 or more and --questions 1 or more")
    if any(v is not None and v <= 0 for v in (args.gpu_memory, args.host_memory)):
        raise ValueError("--gpu-memory and --host-memory are GiB, more than 0")
    config = load_config(args.config, args.set, recipe=args.recipe)
    records = None  # without the data, the engines' media (media.per_prompt: auto) allow every medium
    if args.questions is None:
        import tempfile

        config = _absolute_config(config, must_exist=("data.train",))
        with tempfile.TemporaryDirectory() as scratch:  # skipped records are counted here, not written anywhere
            data = load_run_data(config.data, Path(scratch), lambda message: print(f"echoink: {message}"))
        questions, records = len(data.train), [*data.train, *data.valid]
    else:
        config, questions = _absolute_config(config, must_exist=()), args.questions
    shape = None
    if args.gpus > 0:  # the memory estimate: the thinker's shape from its config.json
        if (Path(config.model_path) / "config.json").is_file():
            from omni.sizes import model_shape

            shape = model_shape(Path(config.model_path))
        else:
            print(f"echoink: no memory estimate: {config.model_path}/config.json is not here (a released layout's "
                  "config: echoink model tiny --layout 3b|7b --config-only --out DIR, then --set model_path=DIR)")
    cluster = cluster_of(config.ray.use_gpus, args.gpus, args.gpu_memory, args.host_memory)
    try:
        plan = make_plan(config, cluster, train_size=questions, records=records, shape=shape)
    except RuntimeError as exc:  # a layout the cluster cannot hold: the answer to this command, not a crash
        raise ValueError(f"{exc} (--gpus {args.gpus})") from None
    print(plan.describe())
    return 0


def _eval(args: argparse.Namespace) -> int:
    from echoink.eval_job import run_eval
    from orchestrator.config import load_config

    # the checkpoint comes from --checkpoint, not model_path: only the split's data must exist
    config = _absolute_config(load_config(args.config, args.set), must_exist=(f"data.{args.split}", "data.media_root"))
    checkpoint = _absolute_arg(args.checkpoint, "--checkpoint", must_exist=True)
    out = _absolute_arg(args.out, "--out", must_exist=False) if args.out is not None else None
    ablate = [c.strip() for c in args.ablate.split(",")] if args.ablate else None
    result = run_eval(
        config,
        checkpoint,
        split=args.split,
        mode=args.mode,
        samples=args.samples,
        ablate=ablate,
        limit=args.limit,
        out_dir=out,
        protocol=args.protocol,
    )
    print(f"protocol: {result.summary['protocol']['name']} ({result.summary['protocol']['description']})")
    print(result.table())
    print(f"results: {result.out_dir / 'results.jsonl'}")
    print(f"summary: {result.out_dir / 'summary.json'}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import json

    from evaluation.results import compare, compare_table

    result = compare(args.a, args.b, condition=args.condition, allow_mixed_protocols=args.allow_mixed_protocols)
    print(compare_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from echoink.reproduce import reproduce

    state = reproduce(
        args.out,
        model=args.model,
        omniinstruct=args.omniinstruct,
        rehearse=args.rehearse,
        config_path=args.config,
        overrides=args.set,
        stop_after_steps=args.stop_after_steps,
    )
    if "report" in state:
        print(Path(state["report"]).read_text(encoding="utf-8"))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from watch.plot import plot_run

    paths = plot_run(
        args.run_dir, out_dir=args.out, smoothing=args.smooth, width=args.width, height=args.height, dpi=args.dpi
    )
    for path in paths:
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from watch.report import build_report

    print(build_report(args.run_dir, args.out, sample_steps=args.sample_steps))
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML run config (keys override the defaults)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set grpo.group_size=8 --set learner.lr=1e-5 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echoink",
        description="GRPO for omni-modal (audio + image + text) Qwen2.5-Omni models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets: synthesise or curate").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic question set (audio-image by default, --kind for the others) in the AVQA-R1-6K layout")
    synth.add_argument("--out", required=True, type=Path, help="dataset folder (train/ and valid/ are written in it)")
    synth.add_argument("--train", type=int, default=256, help="training questions (default 256)")
    synth.add_argument("--val", type=int, default=64, help="validation questions (default 64)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--kind", default="image_audio",
                       choices=["image_audio", "video_audio", "video", "audio", "image", "text", "mixed"],
                       help="the data_type of every question, or mixed: all six (default image_audio)")
    synth.add_argument("--types", help="with --kind mixed: the data types to mix, comma-separated (default all six)")
    synth.add_argument("--demo", action="store_true",
                       help="start from `make demo`'s media (avqa.synth.DEMO_SPEC: 56 px, 1 s, shape 0.8-1.0; videos 2 s at 4 fps); "
                       "the flags below still override")
    synth.add_argument("--image-size", type=int, help="square image (and video frame) side in pixels (default 112)")
    synth.add_argument("--audio-seconds", type=float, help="clip length (default 2.0)")
    synth.add_argument("--colours", help="comma-separated colours (default red,blue)")
    synth.add_argument("--tones", help="comma-separated tones (default low,high)")
    synth.add_argument("--shuffle-options", action="store_true", help="shuffle the option order per question")
    synth.add_argument("--shape-scale", type=_scale, metavar="LOW,HIGH",
                       help="the shape's side as a share of the image's, drawn per image (default 0.4,0.7)")
    synth.set_defaults(func=_data_synth)

    avqa = data.add_parser("avqa", help="curate AVQA-R1-6K from OmniInstruct-v1")
    avqa.add_argument("--source", required=True, help="a folder saved by `datasets`, parquet files, or a hub id")
    avqa.add_argument("--split", required=True, choices=["train", "valid"])
    avqa.add_argument("--out", required=True, type=Path, help="dataset folder (the split is written in it)")
    avqa.set_defaults(func=_data_avqa)

    check = data.add_parser("check", help="validate a dataset file or folder and decode its media")
    check.add_argument("path", type=Path, help="a JSON/JSONL file or a folder saved by `datasets`")
    check.add_argument("--media", type=int, default=-1, help="decode the media of the first N records (-1: all)")
    check.set_defaults(func=_data_check)

    path_rule = (
        "Relative paths in the config (model_path, output_dir, data.*) are read against the directory this "
        "command starts in, before any Ray actor sees them; under `ray job submit` that is the job's working_dir "
        '(use --working-dir "local://$PWD" to run in the folder itself).'
    )
    train = sub.add_parser(
        "train", help="run GRPO training (in a local Ray, or the cluster it finds)", description=path_rule
    )
    _add_config_args(train)
    train.add_argument("--recipe", type=Path, metavar="FILE",
                       help="an algorithm's grpo keys over the config file, under --set (configs/recipes/*.yaml)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="K",
        help="train K steps in this invocation, checkpoint, and exit (continue later with --resume)",
    )
    train.set_defaults(func=_train)

    plan = sub.add_parser(
        "plan", help="print what `echoink train` would do with a config (placement, settings, warnings); starts nothing",
        description=path_rule,
    )
    _add_config_args(plan)
    plan.add_argument("--recipe", type=Path, metavar="FILE", help="as for echoink train")
    plan.add_argument("--gpus", type=int, default=0, metavar="N",
                      help="plan for a cluster of N GPUs (default 0: CPUs only)")
    plan.add_argument("--gpu-memory", type=float, metavar="GIB",
                      help="each GPU's memory in GiB as nvidia-smi shows it (80 for an 80 GB A100 or H100, 140 for an "
                      "H200): with --gpus, the run must fit it (per role and phase, orchestrator/memory.py)")
    plan.add_argument("--host-memory", type=float, metavar="GIB", help="a node's host memory in GiB: the run must fit it")
    plan.add_argument("--questions", type=int, metavar="N",
                      help="plan for N training questions instead of reading data.train (a cluster's data, elsewhere)")
    plan.set_defaults(func=_plan)

    ev = sub.add_parser(
        "eval", help="evaluate a checkpoint on a split (greedy or sampled, with ablations)", description=path_rule
    )
    _add_config_args(ev)
    ev.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint folder (base or trained)")
    ev.add_argument("--split", default="valid", choices=["valid", "train"])
    ev.add_argument(
        "--protocol",
        choices=["fair", "paper-base", "paper-trained"],
        help="how the model is asked and scored (default: eval.protocol of the config, fair): fair = the training "
        "prompt, --mode decoding, the reward's parser; paper-base / paper-trained = the EchoInk-R1 paper's "
        "protocols for the base and the trained model (their own prompt, decoding, 1024 tokens, lenient parser)",
    )
    ev.add_argument("--mode", choices=["greedy", "sampled"], help="default: eval.mode of the config (fair protocol)")
    ev.add_argument("--samples", type=int, help="samples per question in sampled mode (default: eval.samples of the config, 1)")
    ev.add_argument("--ablate", help="conditions, e.g. none,audio,image,video,both (audio → silence, image and video → grey, both → every medium)")
    ev.add_argument("--limit", type=int, help="only the first N questions")
    ev.add_argument("--out", type=Path, help="output folder (default: CHECKPOINT/eval-SPLIT-MODE)")
    ev.set_defaults(func=_eval)

    cmp_ = sub.add_parser("compare", help="compare two evaluation folders question by question (McNemar)")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    cmp_.add_argument("--condition", default="none", help="which ablation condition to compare (default none)")
    cmp_.add_argument("--json", type=Path, help="also write the comparison as JSON here")
    cmp_.add_argument(
        "--allow-mixed-protocols",
        action="store_true",
        help="compare folders evaluated with different protocols (refused by default: the difference would mix "
        "the models' with the protocols')",
    )
    cmp_.set_defaults(func=_compare)

    rep = sub.add_parser(
        "reproduce",
        help="the EchoInk-R1 paper's numbers: curate, evaluate the base model, train, evaluate, report",
        description="Curate AVQA-R1-6K from OmniInstruct-v1, evaluate the base model with the paper's paper-base "
        "protocol and the fair one, train with configs/echoink_r1_7b.yaml, evaluate the result with "
        "paper-trained and fair, and write OUT/report.md beside the paper's 80.53 / 85.77. Each stage leaves a "
        "marker in OUT: the same command again continues where a call stopped. " + path_rule,
    )
    rep.add_argument("--model", type=Path, help="the base checkpoint (Qwen2.5-Omni-7B); --rehearse: default a tiny one")
    rep.add_argument("--omniinstruct", help="OmniInstruct-v1: a `datasets` folder, parquet files or a hub id; "
                     "--rehearse: default a synthetic source")
    rep.add_argument("--out", required=True, type=Path, help="the reproduction's folder (data, eval, train, report.md)")
    rep.add_argument("--rehearse", action="store_true",
                     help="the whole chain in minutes on CPUs: tiny random model, synthetic source, 2 steps, "
                     "the paper protocols' token limit cut")
    rep.add_argument("--config", type=Path, help="another reference config (default configs/echoink_r1_7b.yaml)")
    rep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key of the reference config (repeatable), e.g. --set rollout.num_engines=2")
    rep.add_argument("--stop-after-steps", type=int, metavar="K",
                     help="train K steps in this call and stop; the same command again continues")
    rep.set_defaults(func=_reproduce)

    plot = sub.add_parser("plot", help="PNG figures from a run folder's metrics.jsonl")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--out", type=Path, help="output folder (default RUN_DIR/plots)")
    plot.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (default 1: none)")
    plot.add_argument("--width", type=int, default=1200, help="pixels (default 1200)")
    plot.add_argument("--height", type=int, default=700, help="pixels (default 700)")
    plot.add_argument("--dpi", type=int, default=100)
    plot.set_defaults(func=_plot)

    report = sub.add_parser(
        "report",
        help="one self-contained HTML page of a run folder: curves, evaluations, before/after, samples",
        description="Writes RUN_DIR/report.html: the training curves, the evaluation tables with their 95 % "
        "intervals and ablations, the paired before/after comparison, and the sampled completions "
        "(log.samples_every) with their picture and a player for their sound, all inlined in the file.",
    )
    report.add_argument("run_dir", type=Path)
    report.add_argument("--out", type=Path, help="the page to write (default RUN_DIR/report.html)")
    report.add_argument("--sample-steps", type=int, default=6,
                        help="how many sampled steps to show, spread over the run (default 6; 0: all)")
    report.set_defaults(func=_report)

    model = sub.add_parser("model", help="checkpoints").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("tiny", help="build a random-weight Qwen2.5-Omni or Qwen3-Omni checkpoint offline (tiny by default)")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--family", default="qwen2_5_omni", choices=sorted(MODEL_LAYOUTS),
                      help="the model family (default qwen2_5_omni); a run reads it from the checkpoint's config")
    tiny.add_argument("--layout", default="tiny", choices=sorted({n for names in MODEL_LAYOUTS.values() for n in names}),
                      help="qwen2_5_omni: tiny (CPU tests), small (GPU smoke), 2b, 3b / 7b (the released thinkers' "
                      "layouts); qwen3_omni: tiny, 30b-a3b (the released thinker's layout)")
    tiny.add_argument("--config-only", action="store_true",
                      help="no weight file: vLLM load_format=dummy / learner random_init (big layouts)")
    tiny.set_defaults(func=_model_tiny)
    warm = model.add_parser(
        "warmstart",
        help="teach a tiny checkpoint the answer format (random option letter) before GRPO",
        description="Supervised fine-tuning on '<think>…</think><answer>X</answer>' targets whose reasoning names "
        "no option and whose letter is drawn uniformly: after it the format reward is high and the accuracy "
        "is at chance, so GRPO's gain is visible. DeepSpeed ranks on the CPU; for tiny checkpoints.",
    )
    warm.add_argument("--model", required=True, type=Path, help="checkpoint to start from")
    warm.add_argument("--data", required=True, type=Path, help="training split (JSON/JSONL or a datasets folder)")
    warm.add_argument("--out", required=True, type=Path, help="new checkpoint folder (must not hold one)")
    warm.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    warm.add_argument("--batch", type=int, default=32, help="sequences per step (default 32)")
    warm.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    warm.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (default 2)")
    warm.add_argument("--seed", type=int, default=0)
    warm.set_defaults(func=_model_warmstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, TimeoutError) as exc:
        print(f"echoink: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
