"""`echoink plot RUN_DIR`: PNG figures from metrics.jsonl (training curves like the paper's)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from watch.jsonl import read_metrics

FIGURES: dict[str, tuple[str, Sequence[tuple[str, str]]]] = {
    "training_curves": ("Accuracy reward and completion length", (("reward/accuracy", "accuracy reward"), ("completion_length/mean", "completion length"))),
    "rewards": ("Rewards", (("reward/total", "total"), ("reward/accuracy", "accuracy"), ("reward/format", "format"))),
    "kl": ("KL to the reference", (("kl", "KL (k3)"),)),
    "timings": ("Step time", (("timing/rollout_s", "rollout"), ("timing/learn_s", "learn"), ("timing/weight_sync_s", "weight sync"), ("timing/step_s", "step"))),
    "eval": ("Validation accuracy", (("eval/accuracy", "greedy accuracy"),)),
}


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (1: unchanged); NaNs are skipped."""
    if window <= 1:
        return list(values)
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def plot_run(
    run_dir: Path,
    *,
    out_dir: Path | None = None,
    smoothing: int = 1,
    width: int = 1200,
    height: int = 700,
    dpi: int = 100,
) -> list[Path]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (a training run folder?)")
    rows = read_metrics(path)
    if not rows:
        raise ValueError(f"{path} is empty")
    out = out_dir or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, _title, png in render_figures(rows, smoothing=smoothing, width=width, height=height, dpi=dpi):
        target = out / f"{name}.png"
        target.write_bytes(png)
        written.append(target)
    return written


def render_figures(
    rows: list[dict], *, smoothing: int = 1, width: int = 1200, height: int = 700, dpi: int = 100
) -> list[tuple[str, str, bytes]]:
    """(name, title, PNG bytes) of each figure of ``FIGURES`` whose metrics the rows hold; shared by
    `echoink plot` (files) and `echoink report` (inlined in the page)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for name, (title, keys) in FIGURES.items():
        present = [(k, label) for k, label in keys if _series(rows, k)[0]]
        if not present:
            continue
        # evaluations are every eval.every steps: a window of steps would average different evaluations
        window = 1 if name == "eval" else smoothing
        fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
        if name == "training_curves" and len(present) == 2:
            ax = fig.add_subplot(111)
            twin = ax.twinx()
            for axis, (key, label), colour in ((ax, present[0], "tab:blue"), (twin, present[1], "tab:orange")):
                steps, values = _series(rows, key)
                axis.plot(steps, smooth(values, window), color=colour, label=label)
                axis.set_ylabel(label, color=colour)
            ax.set_xlabel("step")
        else:
            ax = fig.add_subplot(111)
            for key, label in present:
                steps, values = _series(rows, key)
                ax.plot(steps, smooth(values, window), label=label, marker="o" if len(steps) < 20 else None)
            ax.set_xlabel("step")
            ax.legend()
        ax.set_title(title + (f" (moving average of {window})" if window > 1 else ""))
        ax.grid(alpha=0.3)
        fig.tight_layout()  # the axis labels inside the picture; the size stays the one asked for
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)  # no tight bbox: the file keeps the size asked for
        plt.close(fig)
        figures.append((name, title, buffer.getvalue()))
    return figures
