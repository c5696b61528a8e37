"""Asynchronous overlap: step time with one-step-off-policy training (the rollout of step t+1 runs
while the learner trains on step t; importance weights correct for the lag) against the default
on-policy loop, same hardware, same run length. Target: ≥ 1.3× faster.

    python benchmarks/bench_async.py [--layout 2b] [--steps 6]

Both runs go through `echoink train`'s trainer: engine on one GPU, learner on the other, NCCL sync.
The first step (engine and learner warm-up) is left out of the medians.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="2b")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="check the script on CPUs (not a number)")
    args = parser.parse_args()

    from orchestrator.config import load_config
    from orchestrator.trainer import train
    from watch.jsonl import read_metrics

    common.start_ray()
    folder = common.model_folder(args.layout, weights=args.cpu)
    data = common.data_folder(args.questions * args.steps, image_size=112 if args.cpu else 448,
                              audio_seconds=2 if args.cpu else 10)
    medians = {}
    details = {}
    for off_policy in (False, True):
        out = common.WORK / f"async-{off_policy}"
        shutil.rmtree(out, ignore_errors=True)
        overrides = [
            f"model_path={folder}", f"output_dir={out}",
            f"data.train={data / 'train' / 'omni_rl_format_train.json'}", "data.valid=null",
            f"total_steps={args.steps}", f"grpo.group_size={args.group}", f"grpo.questions_per_step={args.questions}",
            f"grpo.off_policy={str(off_policy).lower()}", f"sampling.max_new_tokens={args.tokens}",
            "rollout.max_model_len=4096", "rollout.memory_share=0.8", "learner.num_ranks=1", "learner.zero_stage=2",
            "learner.micro_batch_size=8", "learner.lr=1e-6", "checkpoint.every=0", "checkpoint.at_end=false",
            "eval.at_end=false", "sync.bucket_mb=512",
        ]
        if not args.cpu:
            overrides += ["rollout.load_format=dummy", "learner.random_init=true", "ray.use_gpus=yes",
                          "learner.dtype=bfloat16"]
        train(load_config(None, overrides), console=False)
        rows = read_metrics(out / "metrics.jsonl")[1:]
        medians[off_policy] = common.median([r["timing/step_s"] for r in rows])
        details[off_policy] = {k: common.median([r[k] for r in rows]) for k in
                               ("timing/rollout_s", "timing/learn_s", "timing/weight_sync_s", "timing/step_s")}
    common.report(
        "async_overlap",
        [
            ("layout / step", f"{args.layout}; {args.questions} questions × {args.group} × {args.tokens} tokens"),
            ("on-policy step (median)", f"{medians[False]:.2f} s  " + _parts(details[False])),
            ("one-step-off step (median)", f"{medians[True]:.2f} s  " + _parts(details[True])),
        ],
        ("speed-up (on / off-policy step time)", medians[False] / medians[True]),
        {"on_policy": details[False], "off_policy": details[True]},
    )


def _parts(d: dict[str, float]) -> str:
    return f"(rollout {d['timing/rollout_s']:.2f}, learn {d['timing/learn_s']:.2f}, sync {d['timing/weight_sync_s']:.2f})"


if __name__ == "__main__":
    main()
