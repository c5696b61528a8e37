"""Every omni input on one engine: what each data type costs the rollout, and whether the learner
scores what vLLM sampled, type by type, in the same run on the same machine.

For each type (text, image, audio, image_audio, video, video_audio) the same number of questions
× completions × tokens (ignore_eos) goes, three times with the types interleaved, through a bare `vllm.LLM.generate` with the engine's own
arguments and prepared prompts (`rollout.engine.llm_kwargs`, `omni.inputs.prepare_prompt`): the
time per type against the text-only type's is the price of its media (encoders, longer prefill).
Then the learner's transformers thinker (same weights, same device and dtype) scores the first
question's completions of each type: prompt tokens equal, and the largest |Δ log p| to vLLM's.

    python benchmarks/bench_every_input.py [--layout 2b] [--questions 8] [--group 8] [--tokens 128]
    python benchmarks/bench_every_input.py --cpu     # the tiny layout and small media: checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

ORDER = ("text", "image", "audio", "image_audio", "video", "video_audio")
REPEATS = 3  # timed passes per type; the median is reported


def mixed_data(count: int, size: int, seconds: float):
    from avqa import load_records
    from avqa.synth import SynthSpec, synth_dataset

    folder = common.WORK / f"every-input-{count}-{size}-{seconds:g}"
    if not (folder / "train" / "omni_rl_format_train.json").is_file():
        spec = SynthSpec(image_size=size, audio_seconds=seconds, video_seconds=seconds, video_fps=4.0)
        synth_dataset(folder, train=count * len(ORDER), val=0, seed=0, spec=spec, kind="mixed", splits=("train",))
    records = load_records(folder / "train" / "omni_rl_format_train.json")
    return {t: [r for r in records if r.data_type == t][:count] for t in ORDER}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="2b")
    parser.add_argument("--questions", type=int, default=8, help="questions per type")
    parser.add_argument("--group", type=int, default=8, help="completions per question")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--size", type=int, default=448, help="picture and frame side in pixels")
    parser.add_argument("--seconds", type=float, default=8.0, help="clip and video length")
    parser.add_argument("--frames", type=int, default=16, help="media.max_video_frames")
    parser.add_argument("--cpu", action="store_true", help="tiny layout, small media, few tokens: a check of the script")
    args = parser.parse_args()
    if args.cpu:
        args.layout, args.questions, args.group, args.tokens, args.size, args.seconds, args.frames = "tiny", 2, 2, 8, 56, 2.0, 4

    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    import torch
    import vllm
    from vllm.platforms import current_platform

    from omni.family import family_of
    from omni.forward import completion_logprobs
    from omni.inputs import (
        MediaSettings,
        add_positions,
        collate,
        encode_prompt,
        load_processor,
        media_token_ids,
        prepare_prompt,
    )
    from omni.sampling import suppression_bias
    from rollout.engine import completion_from_vllm, llm_kwargs, sampling_params
    from rollout.types import EngineSettings, SamplingSettings

    folder = common.model_folder(args.layout, weights=True)  # one set of random weights for both sides
    by_type = mixed_data(args.questions, args.size, args.seconds)
    media = MediaSettings(max_video_frames=args.frames)
    cpu = current_platform.is_cpu()
    settings = EngineSettings(model_path=folder, max_model_len=8192, media=media, enforce_eager=cpu,
                              memory_share=0.6, seed=0)
    llm = vllm.LLM(**llm_kwargs(settings, is_cpu=cpu))
    processor = load_processor(folder)
    bias = suppression_bias(media_token_ids(processor.tokenizer))  # as the engines do
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=args.tokens, ignore_eos=True)
    distribution = sampling.distribution(media_token_ids(processor.tokenizer))  # what vLLM's log-probs are of
    prompts = {t: [prepare_prompt(r, processor, media=media) for r in rs] for t, rs in by_type.items()}

    def run(kind: str) -> tuple[float, list]:
        inputs = [p.vllm_input() for p in prompts[kind]]
        params = [sampling_params(sampling, args.group, 1000 + i, bias) for i in range(len(inputs))]
        started = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - started, outputs

    for kind in ORDER:  # warm-up: each type's first encoder calls and shapes
        run(kind)
    times: dict[str, list[float]] = {kind: [] for kind in ORDER}
    outputs: dict[str, list] = {}
    for _ in range(REPEATS):  # the types interleaved, so a slow moment of the machine hits them alike
        for kind in ORDER:
            took, outputs[kind] = run(kind)
            times[kind].append(took)
    seconds = {kind: common.median(values) for kind, values in times.items()}

    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    # the engine stays up (memory_share 0.6): the thinker fits beside it
    model = family_of(folder).thinker_type().from_pretrained(str(folder), dtype=dtype).to(device).eval()
    tok = processor.tokenizer
    rows, extra, problems = [], {"layout": args.layout, "per_type": {}}, []
    for kind in ORDER:
        first = outputs[kind][0]
        features = add_positions(model, encode_prompt(processor, prompts[kind][0]))
        same_ids = list(first.prompt_token_ids) == features.input_ids.tolist()
        completions = [completion_from_vllm(c) for c in first.outputs[:2]]
        batch = collate([features] * len(completions), [c.token_ids for c in completions], pad_id=tok.pad_token_id,
                        eos_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
        compared: list[torch.Tensor] = []
        with torch.no_grad():
            completion_logprobs(model, batch.to(device, float_dtype=dtype), distribution=distribution, sampling=compared)
        learner = compared[0].float().cpu()
        gaps = [float((learner[i] - torch.tensor(c.logprobs)).abs().max()) for i, c in enumerate(completions)]
        gap = math.nan if any(math.isnan(g) for g in gaps) else max(gaps)  # max() alone can hide a NaN
        if not same_ids:
            problems.append(f"{kind}: vLLM's prompt ids differ from the learner's")
        if not math.isfinite(gap):
            problems.append(f"{kind}: a log-prob is not finite")
        tokens = sum(len(o.prompt_token_ids) for o in outputs[kind]) / len(outputs[kind])
        ratio = seconds[kind] / seconds["text"]
        extra["per_type"][kind] = {"seconds": seconds[kind], "prompt_tokens": tokens, "vs_text": ratio,
                                   "prompt_ids_equal": same_ids, "max_abs_logprob_gap": gap}
        rows.append((kind, f"{tokens:7.0f} prompt tokens  {seconds[kind]:7.2f} s  ×{ratio:5.2f} of text  "
                           f"ids {'equal' if same_ids else 'DIFFER'}  max|Δlog p| {gap:.1e}"))
    shape = f"{args.questions} questions × {args.group} × {args.tokens} tokens a type"
    rows.insert(0, ("shape", f"{shape}; {args.size}-px media, {args.seconds:g}-s clips, ≤ {args.frames} frames; {dtype}"))
    extra["settings"] = dataclasses.asdict(media) | {"questions": args.questions, "group": args.group, "tokens": args.tokens}
    extra["problems"] = problems
    common.report("every_input", rows, ("video_audio / text time", extra["per_type"]["video_audio"]["vs_text"]), extra)
    if problems:
        raise SystemExit("not trusted: " + "; ".join(problems))


if __name__ == "__main__":
    main()
