"""Learner: tokens/s per GPU and model FLOPs utilisation of one GRPO step (policy forward and
backward, reference forward) with image + audio inputs, bf16, ZeRO-3, gradient checkpointing.
Target: MFU ≥ 40 %.

    python benchmarks/bench_learner.py --layout 7b --ranks 2     # the 7B layout on 2 GPUs
    python benchmarks/bench_learner.py --layout 2b --ranks 1     # a ~2B layout on 1 GPU

A step holds GRPO's shape: G completions of each question (`--group-size`, 16 as in the reference
run). It runs twice on the same completions, with `learner.share_prompts` (the default: each prompt
and its media once per micro-batch) and without (one copy per completion), and prints the speed-up.

MFU counts 6·N per token for the policy (forward + backward) and, separately, 8·N with the
reference forward; N is every parameter of the thinker; peak 989 TFLOP/s (dense bf16, H100/H200).
"Computed" tokens are what the forward ran (a shared prompt once per micro-batch); "sequence"
tokens are prompt + completion of every completion, the work the step stands for. Recomputation
by gradient checkpointing is not credited.
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
    parser.add_argument("--group-size", type=int, default=16, help="G: completions per question")
    parser.add_argument("--no-unshared", action="store_true", help="skip the one-copy-per-completion run")
    parser.add_argument("--tokens", type=int, default=768, help="completion length")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=3, choices=(2, 3))
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
    questions = max(1, -(-total // args.group_size))
    data = common.data_folder(max(8, questions), image_size=args.image_size, audio_seconds=args.audio_seconds)
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
        Experience(records[i // args.group_size], completion(), advantage=rng.choice([-1.0, 1.0]))
        for i in range(total)
    ]

    def measure(share: bool) -> dict:
        settings = LearnerSettings(
            model_path=folder, num_ranks=args.ranks, zero_stage=args.zero_stage, dtype="auto", gradient_checkpointing=True,
            micro_batch_size=args.micro_batch, lr=1e-6, beta=0.001, random_init=not args.cpu,
            max_new_tokens=args.tokens, total_steps=args.steps + 1, share_prompts=share,
        )
        group = LearnerGroup(settings, [{"num_cpus": 2, "num_gpus": 0 if args.cpu else 1}] * args.ranks)
        try:
            group.train_step(experiences)  # warm-up
            runs = [group.train_step(experiences) for _ in range(args.steps)]
        finally:
            group.kill()
        seconds = common.median([r["timing/learn_s"] for r in runs])
        computed = runs[-1]["learner/input_tokens"] / seconds / args.ranks
        print(f"share_prompts={share}: {seconds:.2f} s per step, {runs[-1]['learner/input_tokens']:.0f} computed tokens", flush=True)
        return {
            "seconds": seconds, "runs": [round(r["timing/learn_s"], 2) for r in runs], "input_tokens": runs[-1]["learner/input_tokens"],
            "computed_per_gpu": computed, "mfu_6n": 6 * params * computed / common.H100_BF16_PEAK,
            "mfu_8n": 8 * params * computed / common.H100_BF16_PEAK,
            "peak_gib": max(r.get("memory/learner_peak_gb", 0.0) for r in runs),
        }

    shared = measure(True)
    unshared = None if args.no_unshared else measure(False)
    rows = [
        ("layout", f"{args.layout} ({params / 1e9:.2f} B parameters), ZeRO-{args.zero_stage} bf16, gradient checkpointing"),
        ("batch", f"{args.sequences_per_gpu} sequences/GPU, G = {args.group_size}, "
                  f"{args.tokens} completion tokens, micro-batch {args.micro_batch}"),
    ]
    for name, m in (("shared prompts", shared), ("one copy each", unshared)):
        if m is None:
            continue
        rows += [
            (f"{name}: step time (median)", f"{m['seconds']:.2f} s  runs {m['runs']}"),
            (f"{name}: computed tokens/s/GPU", f"{m['computed_per_gpu']:,.0f}  (MFU 6·N {m['mfu_6n']:.3f}, 8·N {m['mfu_8n']:.3f})"),
            (f"{name}: peak memory per GPU", f"{m['peak_gib']:.1f} GiB"),
        ]
    extra = {"params": params, "group_size": args.group_size, "shared": shared, "unshared": unshared}
    if unshared is not None:
        sequence_tokens = unshared["input_tokens"]  # every completion with its whole prompt
        per_gpu = sequence_tokens / shared["seconds"] / args.ranks
        rows.append(("sequence tokens/s/GPU (shared)", f"{per_gpu:,.0f}  (one copy each: "
                     f"{sequence_tokens / unshared['seconds'] / args.ranks:,.0f})"))
        extra["sequence_tokens_per_s_per_gpu"] = per_gpu
        ratio = ("speed-up of shared prompts (step time)", unshared["seconds"] / shared["seconds"])
    else:
        ratio = ("MFU (6·N·computed tokens / 989 TFLOP/s)", shared["mfu_6n"])
    name = f"learner_{args.layout}_{args.ranks}gpu" + ("" if (args.zero_stage, args.micro_batch) == (3, 4) else f"_z{args.zero_stage}_mb{args.micro_batch}")
    common.report(name, rows, ratio, extra)


if __name__ == "__main__":
    main()
