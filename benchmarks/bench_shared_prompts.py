"""Learner forward + backward of one GRPO micro-batch: every completion with its own copy of the
prompt (``collate``) against each distinct prompt once (``collate_shared``, `learner.share_prompts`).

Both give the same log-probs (checked here, and in tests/test_omni_shared_prompts_cpu.py); the
ratio is the time saved. It grows with the group size and with the prompt's share of the tokens
(EchoInk's prompt is ~390 tokens of instructions plus the image and audio tokens).

    python benchmarks/bench_shared_prompts.py                         # the tiny layout, CPU demo sizes
    python benchmarks/bench_shared_prompts.py --layout 2b --completion 768 --image-size 448 --audio-seconds 10 \
        --group 16 --questions 1 --checkpointing                       # the reference run's shape, a GPU
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="tiny")
    parser.add_argument("--questions", type=int, default=2, help="distinct prompts in the micro-batch")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--completion", type=int, default=18, help="completion tokens")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--audio-seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (as the 7B config)")
    args = parser.parse_args()

    import torch

    from avqa import load_records
    from omni.family import family_of
    from omni.forward import completion_logprobs
    from omni.inputs import (
        add_positions,
        collate,
        collate_shared,
        encode_prompt,
        load_processor,
        prepare_prompt,
    )

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    folder = common.model_folder(args.layout, weights=args.layout == "tiny")
    data = common.data_folder(max(args.questions, 4), image_size=args.image_size, audio_seconds=args.audio_seconds)
    processor = load_processor(folder)
    Thinker = family_of(folder).thinker_type()  # noqa: N806 (a class)
    if args.layout == "tiny":
        model = Thinker.from_pretrained(folder, dtype=dtype)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder).thinker_config
        model = Thinker._from_config(config, dtype=dtype)
    model.to(device).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    records = load_records(data / "train" / "omni_rl_format_train.json")[: args.questions]
    features = [add_positions(model, encode_prompt(processor, prepare_prompt(r, processor))) for r in records]
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    words = tok.encode("<think>let me match the colour and the tone</think><answer>A B C D</answer>")
    rng = random.Random(0)
    keys, prompts, completions = [], [], []
    for record, feature in zip(records, features, strict=True):
        for _ in range(args.group):
            keys.append(record.id)
            prompts.append(feature)
            completions.append([rng.choice(words) for _ in range(args.completion - 1)] + [end])
    common_args = dict(pad_id=tok.pad_token_id, eos_ids=[end])
    batches = {
        "per completion": collate(prompts, completions, **common_args).to(device, dtype),
        "shared prompts": collate_shared(prompts, keys, completions, **common_args).to(device, dtype),
    }

    def step(batch):
        def run():
            model.zero_grad(set_to_none=True)
            logp = completion_logprobs(model, batch)
            logp.sum().backward()
            if cuda:
                torch.cuda.synchronize()
            return logp.detach().float().cpu()

        return run

    seconds, logps = {}, {}
    for name, batch in batches.items():
        times, logps[name] = common.timed(step(batch), args.repeats)
        seconds[name] = common.median(times)
    gap = float((logps["per completion"] - logps["shared prompts"]).abs().max())
    tokens = {name: int(b.input_tokens.sum()) for name, b in batches.items()}
    rows = [
        ("layout", args.layout + (", gradient checkpointing" if args.checkpointing else "")),
        ("micro-batch", f"{args.questions} prompts × G={args.group}, {args.completion} completion tokens"),
        ("prompt tokens", str(features[0].input_ids.numel())),
        *[(f"{name}: tokens / seconds", f"{tokens[name]} / {seconds[name]:.3f}") for name in batches],
        ("max |Δ log-prob|", f"{gap:.2e}"),
    ]
    common.report(
        "shared_prompts", rows, ("speed-up (per completion ÷ shared)", seconds["per completion"] / seconds["shared prompts"]),
        {"seconds": seconds, "tokens": tokens, "max_logprob_gap": gap, "args": vars(args)},
    )


if __name__ == "__main__":
    main()
