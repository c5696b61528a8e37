"""One GPU runs the whole loop: a colocated engine and learner rank, the reference step shape.

Runs `echoink train` in colocated placement (configs/omni3b_1gpu.yaml by default) on random weights
in a released layout (vLLM load_format dummy, the learner's random init), synthetic questions with
448-px pictures and 10-s clips, for ``--steps`` steps; the first step is warm-up. Reports the step
and its parts (rollout, sleep, wake, weight transfer, learn), GPU memory per phase, and the weight
transfer against a bare device-to-device copy of the same bytes in the same run (ratio last).

    python benchmarks/bench_colocated.py --layout 3b --steps 6
    python benchmarks/bench_colocated.py --layout 7b --config configs/omni7b_1gpu.yaml --tag lora64
    python benchmarks/bench_colocated.py --cpu        # checks the script on CPUs (not a number)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PARTS = ("timing/rollout_s", "timing/sleep_s", "timing/learn_s", "timing/wake_s", "timing/weight_sync_s", "timing/step_s")
MEMORY = ("memory/gpu_used_awake_gb", "memory/gpu_used_asleep_gb", "memory/learner_peak_gb", "memory/learner_held_gb",
          "memory/host_used_gb")


def bare_copy_seconds(nbytes: int, repeats: int = 5) -> float:
    """A device-to-device copy of ``nbytes`` on this GPU: the floor for a hand-over inside it."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    rest = sorted(times[1:])  # the median, inline: this runs in a Ray task without the benchmarks folder
    return (rest[(len(rest) - 1) // 2] + rest[len(rest) // 2]) / 2


def coin_reward(text: str, record: object, options: object) -> float:
    """Random weights solve nothing, so every reward would be 0, every advantage 0 and every
    gradient exactly 0: a fair coin from the completion's text gives real, finite gradients."""
    return float(zlib.crc32(text.encode()) & 1)


def estimate_rows(config: object, folder: Path, med: dict[str, float]) -> list[tuple[str, str]]:
    """`echoink plan`'s memory estimate for this run (orchestrator/memory.py) against the medians."""
    import torch

    from omni.sizes import model_shape
    from orchestrator.memory import estimate

    card = torch.cuda.get_device_properties(0).total_memory / 2**30
    plan = estimate(config, model_shape(folder), colocated=True, gpu_gib=card)
    step = plan.learner_peak
    awake = plan.both_awake
    med["estimate/learner_peak_gb"], med["estimate/gpu_used_awake_gb"] = step, awake
    rows = []
    for label, guess, key in (("learner peak", step, "memory/learner_peak_gb"), ("both awake", awake, "memory/gpu_used_awake_gb")):
        if key in med:
            rows.append((f"echoink plan: {label}", f"{guess:.1f} GiB estimated, {med[key]:.1f} measured "
                                                   f"({guess / med[key] - 1:+.1%})"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="3b")
    parser.add_argument("--config", default=str(REPO / "configs" / "omni3b_1gpu.yaml"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], help="more config overrides (key=value)")
    parser.add_argument("--cpu", action="store_true", help="check the script on CPUs (not a number)")
    parser.add_argument("--tag", default="", help="appended to the record's name (e.g. lora64_80gb)")
    args = parser.parse_args()

    from orchestrator.config import load_config
    from orchestrator.trainer import train
    from rewards import register_reward
    from watch.jsonl import read_metrics

    register_reward("bench_coin")(coin_reward)

    common.start_ray()
    folder = common.model_folder(args.layout, weights=args.cpu)
    questions = 2 if args.cpu else 8
    data = common.data_folder(questions * args.steps, image_size=112 if args.cpu else 448,
                              audio_seconds=1 if args.cpu else 10)
    name = f"colocated_{args.layout}" + (f"_{args.tag}" if args.tag else "")
    out = common.WORK / name.replace("_", "-")
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"model_path={folder}", f"output_dir={out}", f"data.train={data / 'train' / 'omni_rl_format_train.json'}",
        "data.valid=null", f"total_steps={args.steps}", "checkpoint.every=0", "checkpoint.at_end=false",
        "eval.at_end=false", "eval.every=0", "placement.mode=colocated", "rewards.weights={bench_coin: 1.0}",
    ]
    if args.cpu:
        overrides += ["grpo.group_size=4", "grpo.questions_per_step=2", "sampling.max_new_tokens=16",
                      "rollout.max_model_len=1024", "rollout.enforce_eager=true", "learner.micro_batch_size=4",
                      "learner.gradient_checkpointing=false", "ray.use_gpus=no", "rollout.cpus_per_engine=1",
                      "learner.cpus_per_rank=1", "learner.dtype=float32", "rollout.memory_share=0.1"]
    else:
        overrides += ["rollout.load_format=dummy", "learner.random_init=true"]
    config = load_config(None if args.cpu else args.config, overrides + args.set)
    # the bare copy first (after train() the actors may still be releasing their GPU memory), in a
    # process of its own that exits: a CUDA context left in this driver would hold half a GiB of the
    # card through the run (measured on the H200: 518 MiB)
    from omni.sizes import model_shape

    nbytes = 2 * model_shape(folder).parameters  # bf16 on GPUs
    if args.cpu:
        copy_s = float("nan")
    else:
        import ray

        copy_s = ray.get(ray.remote(num_gpus=1, max_calls=1)(bare_copy_seconds).remote(nbytes))
    train(config, console=True)
    rows = read_metrics(out / "metrics.jsonl")
    bad = [(r["step"], k, r[k]) for r in rows for k in ("loss", "grad_norm") if not math.isfinite(float(r[k]))]
    bad += [(r["step"], "grad_norm", 0.0) for r in rows if float(r["grad_norm"]) == 0.0]
    if bad:
        raise SystemExit(f"non-finite or zero loss / gradient norm on random weights, timings not trusted: {bad}")
    timed = rows[1:] if len(rows) > 1 else rows  # step 1 warms up (CUDA graphs, allocator, IPC opens)
    med = {k: common.median([r[k] for r in timed if k in r]) for k in PARTS + MEMORY if any(k in r for r in timed)}
    handover = sum(med.get(k, 0.0) for k in ("timing/sleep_s", "timing/wake_s", "timing/weight_sync_s"))
    params = json.loads((out / "placement.json").read_text())["learner_ranks"][0]["parameters"]
    if params and 2 * int(params) != nbytes:
        raise SystemExit(f"the learner pushes {params} parameters, the layout's shape has {nbytes // 2}")
    rows_out = [
        ("layout / step", f"{args.layout}; {config.grpo.questions_per_step} questions × {config.grpo.group_size} × "
                          f"{config.sampling.max_new_tokens} tokens; {len(timed)} timed steps (median)"),
        *[(k, f"{med[k]:.3f} s") for k in PARTS if k in med],
        ("handover (sleep + wake + transfer)", f"{handover:.3f} s = {handover / med['timing/step_s']:.1%} of the step"),
        *[(k, f"{med[k]:.1f} GiB") for k in MEMORY if k in med],
        ("weights pushed", f"{nbytes / 2**30:.2f} GiB ({params} parameters)" if params else "?"),
        ("bare device copy of those bytes", f"{copy_s * 1e3:.1f} ms"),
        ("loss / grad norm (last step)", f"{rows[-1]['loss']:.4g} / {rows[-1]['grad_norm']:.4g}"),
    ]
    if not args.cpu:  # echoink plan's estimate beside what was measured (RESULTS.md section 10)
        rows_out += estimate_rows(config, folder, med)
    ratio = med["timing/weight_sync_s"] / copy_s if copy_s == copy_s and copy_s > 0 else float("nan")
    common.report(name, rows_out, ("weight transfer / bare device copy", ratio),
                  {"medians": med, "rows": rows, "bare_copy_s": copy_s, "config": config.model_dump(mode="json")})


if __name__ == "__main__":
    main()
