"""Shared pieces of the benchmarks: model folders, data, timing, the printed table."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

WORK = Path(os.environ.get("ECHOINK_BENCH_DIR", "/tmp/echoink-bench"))
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (H200: the same chip)
# dense bf16 peaks by a word of the device name; an H200 is the H100's GH100 chip with more memory
BF16_PEAKS = {"H100": H100_BF16_PEAK, "H200": H100_BF16_PEAK}


QWEN3 = "qwen3-"  # a layout named qwen3-<layout> is Qwen3-Omni's (omni.fixtures.tiny_qwen3.QWEN3_LAYOUTS)


def model_folder(layout: str, *, weights: bool = False) -> Path:
    """A folder of ``layout`` (config, tokenizer, processor; weights optional): Qwen2.5-Omni's layouts
    by name (7b, 3b, …), Qwen3-Omni's as ``qwen3-<layout>`` (qwen3-30b-a3b, qwen3-tiny)."""
    folder = WORK / f"{layout}-{'weights' if weights else 'config'}"
    if not (folder / "config.json").is_file():
        if layout.startswith(QWEN3):
            from omni.fixtures.tiny_qwen3 import QWEN3_LAYOUTS, build_tiny_qwen3_checkpoint

            build_tiny_qwen3_checkpoint(folder, sizes=QWEN3_LAYOUTS[layout[len(QWEN3):]], weights=weights)
        else:
            from omni.fixtures.tiny import LAYOUTS, build_tiny_checkpoint

            build_tiny_checkpoint(folder, sizes=LAYOUTS[layout], weights=weights)
    return folder


def data_folder(count: int, *, image_size: int = 448, audio_seconds: float = 10.0) -> Path:
    from avqa.synth import SynthSpec, synth_dataset

    folder = WORK / f"data-{count}-{image_size}-{audio_seconds:g}"
    if not (folder / "train" / "omni_rl_format_train.json").is_file():
        spec = SynthSpec(image_size=image_size, audio_seconds=audio_seconds, shuffle_options=True,
                         colours=("red", "blue", "green"), tones=("low", "high"))
        synth_dataset(folder, train=count, val=1, seed=0, spec=spec)
    return folder


def start_ray(gpus: int | None = None) -> None:
    """A local Ray whose workers, and this driver (bare vLLM baselines run here), get the actors'
    environment (orchestrator.placement.actor_env); the GPU kit has no flashinfer sampler."""
    import ray

    from orchestrator.placement import actor_env

    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    env = actor_env()
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        # logical CPUs: actors mostly wait on the GPU, so give them more than the cores
        ray.init(num_cpus=max(os.cpu_count() or 1, 16), num_gpus=gpus, log_to_driver=True, include_dashboard=False,
                 runtime_env={"env_vars": env})


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[list[float], Any]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return times, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return "CPU"


def peak_flops() -> tuple[float | None, str]:
    """Dense bf16 FLOP/s of this machine's GPU and its name; None where no peak is known (the CPU,
    another card): MFU is then not printed, the FLOP counts still are."""
    name = card()
    for word, peak in BF16_PEAKS.items():
        if word in name:
            return peak, f"{peak / 1e12:.0f} TFLOP/s dense bf16 ({word})"
    return None, f"no peak known for {name}"


def report(name: str, rows: list[tuple[str, str]], ratio: tuple[str, float], extra: dict[str, Any]) -> None:
    """Print the table (ratio last) and write a JSON record next to it."""
    width = max(len(k) for k, _ in rows + [ratio[:1] + ("",)])
    print(f"\n== {name} on {card()} ({time.strftime('%Y-%m-%d')})")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"{ratio[0]:<{width}}  {ratio[1]:.3f}")
    out = Path(os.environ.get("OUT", WORK))
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "card": card(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "ratio": {ratio[0]: ratio[1]}, **extra}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
