"""Rollout: the framework's rollout phase (engine actor, pool, media loading, rewards) against a
bare `vllm.LLM.generate` on the same prompts, engine settings and sampling parameters, in the same
run on the same GPU. Reference step shape: 8 questions × 16 completions × 768 tokens (ignore_eos,
so every completion has the same length). Target: ≥ 0.95.

    python benchmarks/bench_rollout.py [--layout 7b] [--questions 8] [--group 16] [--tokens 768] [--hf-questions 2]

It also times, in the same run, how EchoInk-R1 sampled (issue 27): transformers' ``generate`` of
the same thinker (random weights of the layout, bf16, sdpa, its KV cache) on the first
``--hf-questions`` prompts, G completions of each in one call (``num_return_sequences``), the same
temperature and top-p, every completion ``--tokens`` long (``min_new_tokens``, as ignore_eos).
The row is tokens/s against bare vLLM's; 0 skips it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402


class BareVLLM:
    """`vllm.LLM` and nothing else: prompts and media are prepared before the clock starts."""

    def __init__(self, settings, records) -> None:
        import vllm
        from vllm.platforms import current_platform

        from omni.inputs import load_processor, media_token_ids, prepare_prompt
        from omni.sampling import suppression_bias
        from rollout.engine import llm_kwargs

        self.llm = vllm.LLM(**llm_kwargs(settings, is_cpu=current_platform.is_cpu()))
        processor = load_processor(settings.model_path)
        self.bias = suppression_bias(media_token_ids(processor.tokenizer))  # as the engines do
        self.inputs = [prepare_prompt(r, processor, media=settings.media).vllm_input() for r in records]

    def run(self, sampling, n: int) -> tuple[float, int]:
        from rollout.engine import sampling_params

        params = [sampling_params(sampling, n, 1000 + i, self.bias) for i in range(len(self.inputs))]
        started = time.perf_counter()
        outputs = self.llm.generate(self.inputs, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        return seconds, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def transformers_generate(settings, records, group: int, tokens: int, top_p: float) -> list[tuple[float, int]]:
    """EchoInk-R1's sampler: ``generate`` of the thinker, one call per question; (seconds, tokens) each."""
    import torch

    from learner.model import build_thinker
    from learner.types import LearnerSettings
    from omni.inputs import encode_prompt, load_processor, media_token_ids, prepare_prompt

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    learner = LearnerSettings(model_path=settings.model_path, random_init=True, tower_attention="per_window")
    model = build_thinker(learner, device, dtype).eval()
    processor = load_processor(settings.model_path)
    banned = [[t] for t in media_token_ids(processor.tokenizer)]  # the engines suppress them too

    def inputs(record) -> dict:
        features = encode_prompt(processor, prepare_prompt(record, processor, media=settings.media))
        out = {"input_ids": features.input_ids.unsqueeze(0), "attention_mask": torch.ones(1, len(features.input_ids), dtype=torch.long)}
        for key in ("pixel_values", "image_grid_thw", "input_features", "feature_attention_mask"):
            if getattr(features, key) is not None:
                out[key] = getattr(features, key)
        return {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in out.items()}

    def one(record, new: int) -> tuple[float, int]:
        batch = inputs(record)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=top_p, top_k=0,
                                 max_new_tokens=new, min_new_tokens=new, num_return_sequences=group,
                                 bad_words_ids=banned, use_cache=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started, int(out.shape[0] * (out.shape[1] - batch["input_ids"].shape[1]))

    one(records[0], 8)  # warm-up
    return [one(r, tokens) for r in records]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layout", default="7b")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--audio-seconds", type=float, default=10.0)
    parser.add_argument("--hf-questions", type=int, default=2,
                        help="questions for the transformers-generate row (EchoInk-R1's sampler); 0 skips it")
    parser.add_argument("--cpu", action="store_true", help="check the script on CPUs (not a number)")
    args = parser.parse_args()

    import ray

    from avqa import load_records
    from rewards import RewardSet
    from rollout.engine import RolloutEngine
    from rollout.pool import EnginePool
    from rollout.types import EngineSettings, SamplingSettings

    common.start_ray()
    gpu = 0 if args.cpu else 1
    folder = common.model_folder(args.layout, weights=args.cpu)
    data = common.data_folder(args.questions, image_size=args.image_size, audio_seconds=args.audio_seconds)
    records = load_records(data / "train" / "omni_rl_format_train.json")[: args.questions]
    settings = EngineSettings(model_path=folder, max_model_len=4096, memory_share=0.85,
                              load_format="safetensors" if args.cpu else "dummy", dtype="auto")
    sampling = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=args.tokens, seed=0, ignore_eos=True)

    bare = ray.remote(BareVLLM).options(num_cpus=1, num_gpus=gpu).remote(settings, records)
    bare_runs = [ray.get(bare.run.remote(sampling, args.group)) for _ in range(args.repeats + 1)][1:]
    ray.kill(bare)
    time.sleep(5)  # the GPU memory of the bare engine is released with its process

    engine = ray.remote(RolloutEngine).options(num_cpus=1, num_gpus=gpu).remote(settings)
    ray.get(engine.ping.remote())
    pool = EnginePool([engine])
    rewards = RewardSet()

    def framework() -> tuple[float, int]:
        started = time.perf_counter()
        results = pool.generate(records, args.group, sampling)
        for record, result in zip(records, results, strict=True):
            for completion in result.completions:
                rewards.score(completion.text, record)
        return time.perf_counter() - started, sum(len(c.token_ids) for r in results for c in r.completions)

    framework()  # warm-up
    ours = [framework() for _ in range(args.repeats)]
    ray.kill(engine)
    bare_tps = [tokens / seconds for seconds, tokens in bare_runs]
    our_tps = [tokens / seconds for seconds, tokens in ours]
    b, o = common.median(bare_tps), common.median(our_tps)
    hf_rows: list[tuple[str, str]] = []
    hf_tps: list[float] = []
    if args.hf_questions > 0:
        time.sleep(5)  # the framework engine's GPU memory goes with its process
        task = ray.remote(num_cpus=1, num_gpus=gpu, max_calls=1)(transformers_generate)
        hf = ray.get(task.remote(settings, records[: args.hf_questions], args.group, args.tokens, sampling.top_p))
        hf_tps = [tokens / seconds for seconds, tokens in hf]
        h = common.median(hf_tps)
        hf_rows = [("transformers generate (EchoInk-R1's sampler)",
                    f"{h:,.0f} tokens/s  runs {[round(x) for x in hf_tps]}  ({args.hf_questions} questions × {args.group}, "
                    f"one call each): bare vLLM is {b / h:.1f}× faster")]
    common.report(
        "rollout",
        [
            ("layout / shape", f"{args.layout}; {args.questions} questions × {args.group} × {args.tokens} tokens, "
                               f"{args.image_size}px images, {args.audio_seconds:g} s audio"),
            ("bare vllm.LLM.generate", f"{b:,.0f} tokens/s  runs {[round(x) for x in bare_tps]}"),
            ("framework rollout", f"{o:,.0f} tokens/s  runs {[round(x) for x in our_tps]}"),
            *hf_rows,
        ],
        ("framework / bare", o / b),
        {"bare_tokens_per_s": bare_tps, "framework_tokens_per_s": our_tps, "transformers_generate_tokens_per_s": hf_tps},
    )


if __name__ == "__main__":
    main()
