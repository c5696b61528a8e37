"""Learner: tokens/s per GPU and model FLOPs utilisation of one GRPO step (policy forward and
backward, reference forward) with image + audio inputs, bf16, ZeRO-3, gradient checkpointing.
Target: MFU ≥ 40 %.

    python benchmarks/bench_learner.py --layout 7b --ranks 2     # the 7B layout on 2 GPUs
    python benchmarks/bench_learner.py --layout 2b --ranks 1     # a ~2B layout on 1 GPU

MFU counts 6·N per token for the policy (forward + backward) and, separately, 8·N with the
reference forward; N is every parameter of the thinker; tokens are prompt + completion tokens;
peak 989 TFLOP/s (dense bf16, H100/H200). Recomputation by gradient checkpointing is not credited.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="7b")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sequences-per-gpu", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=768, help="completion length")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--cpu", action="store_true", help="check the script on CPUs (not a number)")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, Qwen2_5OmniThinkerForConditionalGeneration

    from avqa import load_records
    from learner.group import LearnerGroup
    from learner.types import Experience, LearnerSettings
    from omni.inputs import load_processor, media_token_ids

    common.start_ray()
    folder = common.model_folder(args.layout, weights=args.cpu)
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(str(folder)).thinker_config
        params = sum(p.numel() for p in Qwen2_5OmniThinkerForConditionalGeneration._from_config(config).parameters())
    total = args.sequences_per_gpu * args.ranks
    data = common.data_folder(max(8, total // 16), image_size=args.image_size, audio_seconds=args.audio_seconds)
    records = load_records(data / "train" / "omni_rl_format_train.json")
    tokenizer = load_processor(folder).tokenizer
    banned = set(media_token_ids(tokenizer)) | {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    rng = random.Random(0)
    vocab = len(tokenizer)

    def completion() -> list[int]:
        out = []
        while len(out) < args.tokens:
            token = rng.randrange(vocab)
            if token not in banned:
                out.append(token)
        return out

    experiences = [
        Experience(records[i % len(records)], completion(), advantage=rng.choice([-1.0, 1.0]))
        for i in range(total)
    ]
    settings = LearnerSettings(
        model_path=folder, num_ranks=args.ranks, zero_stage=3, dtype="auto", gradient_checkpointing=True,
        micro_batch_size=args.micro_batch, lr=1e-6, beta=0.001, random_init=not args.cpu,
        max_new_tokens=args.tokens, total_steps=args.steps + 1,
    )
    group = LearnerGroup(settings, [{"num_cpus": 2, "num_gpus": 0 if args.cpu else 1}] * args.ranks)
    group.train_step(experiences)  # warm-up
    runs = [group.train_step(experiences) for _ in range(args.steps)]
    group.kill()
    seconds = common.median([r["learn_seconds"] for r in runs])
    tokens = runs[-1]["input_tokens"]
    per_gpu = tokens / seconds / args.ranks
    mfu6 = 6 * params * per_gpu / common.H100_BF16_PEAK
    mfu8 = 8 * params * per_gpu / common.H100_BF16_PEAK
    peak = max(r.get("memory/learner_peak_gb", 0.0) for r in runs)
    common.report(
        f"learner_{args.layout}_{args.ranks}gpu",
        [
            ("layout", f"{args.layout} ({params / 1e9:.2f} B parameters), ZeRO-3 bf16, gradient checkpointing"),
            ("batch", f"{args.sequences_per_gpu} sequences/GPU × ~{tokens / total:.0f} tokens, micro-batch {args.micro_batch}"),
            ("step time (median)", f"{seconds:.2f} s  runs {[round(r['learn_seconds'], 2) for r in runs]}"),
            ("tokens/s per GPU", f"{per_gpu:,.0f}"),
            ("MFU, 8·N (with reference fwd)", f"{mfu8:.3f}"),
            ("peak memory per GPU", f"{peak:.1f} GiB"),
        ],
        ("MFU (6·N·tokens / 989 TFLOP/s)", mfu6),
        {"params": params, "tokens_per_step": tokens, "seconds": [r["learn_seconds"] for r in runs],
         "tokens_per_s_per_gpu": per_gpu, "mfu_6n": mfu6, "mfu_8n": mfu8, "peak_gib": peak},
    )


if __name__ == "__main__":
    main()
