"""Weight sync: one full push learner (GPU 0) → vLLM engine (GPU 1), against a bare NCCL broadcast
of the same bytes between the same two actors in the same run. Target: ≤ 1.2× the bare broadcast.

    python benchmarks/bench_weight_sync.py [--layout 7b] [--bucket-mb 1024] [--repeats 5]

The push is the framework's own path: the learner rank (DeepSpeed ZeRO-3, weights only) gathers,
packs buckets and broadcasts with the next bucket in flight; the engine receives into the next
buffer while loading the current one into vLLM, then resets its prefix and encoder caches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="7b")
    parser.add_argument("--bucket-mb", type=float, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPUs (a check of the script, not a number)")
    args = parser.parse_args()

    import ray

    from learner.group import LearnerGroup
    from learner.types import LearnerSettings
    from orchestrator.weight_sync import WeightSync
    from rollout.engine import RolloutEngine
    from rollout.pool import EnginePool
    from rollout.types import EngineSettings

    common.start_ray()
    gpu = 0 if args.cpu else 1
    folder = common.model_folder(args.layout, weights=args.cpu)
    learner = LearnerGroup(
        LearnerSettings(model_path=folder, num_ranks=1, zero_stage=3, dtype="auto", train=False, beta=0.0,
                        random_init=not args.cpu, gradient_checkpointing=False),
        [{"num_cpus": 1, "num_gpus": gpu}],
    )
    engine = ray.remote(RolloutEngine).options(num_cpus=1, num_gpus=gpu).remote(
        EngineSettings(model_path=folder, max_model_len=4096, memory_share=0.6, enforce_eager=True,
                       load_format="safetensors" if args.cpu else "dummy", dtype="auto")
    )
    ray.get(engine.ping.remote())
    sync = WeightSync(learner, EnginePool([engine]), backend="gloo" if args.cpu else "nccl",
                      bucket_bytes=int(args.bucket_mb * 2**20), timeout_s=600)
    sizes = [spec.nbytes for spec in sync.specs]

    def push() -> float:
        return sync.push().seconds

    def bare() -> float:
        receiving = engine.receive_raw.remote(sizes)
        sent = learner.workers[0].send_raw.remote(sizes)
        ray.get([receiving, sent])
        return 0.0

    push_times, _ = common.timed(push, args.repeats)
    bare_times, _ = common.timed(bare, args.repeats)
    total = sum(sizes)
    full, floor = common.median(push_times), common.median(bare_times)
    common.report(
        "weight_sync",
        [
            ("layout", args.layout),
            ("bytes per push", f"{total / 1e9:.2f} GB in {len(sizes)} buckets, {sync.tensors} tensors"),
            ("full push (median)", f"{full * 1e3:.1f} ms  ({total / full / 1e9:.0f} GB/s)  runs {[round(t * 1e3) for t in push_times]}"),
            ("bare broadcast (median)", f"{floor * 1e3:.1f} ms  ({total / floor / 1e9:.0f} GB/s)  runs {[round(t * 1e3) for t in bare_times]}"),
        ],
        ("push / bare broadcast", full / floor),
        {"push_s": push_times, "bare_s": bare_times, "bytes": total, "buckets": len(sizes), "tensors": sync.tensors},
    )
    learner.kill()
    ray.kill(engine)


if __name__ == "__main__":
    main()
