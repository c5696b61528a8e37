"""Step metrics to the console (a progress bar), metrics.jsonl, TensorBoard and Ray's metrics."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

CONSOLE_KEYS = (
    ("reward/total", "reward"),
    ("reward/accuracy", "acc"),
    ("reward/format", "fmt"),
    ("completion_length/mean", "len"),
    ("kl", "kl"),
    ("timing/step_s", "s/step"),
)


def _ray_name(key: str) -> str:
    return "echoink_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def prometheus_name(key: str) -> str:
    """The name Ray's Prometheus endpoint serves metric ``key`` under (Ray prefixes ``ray_``):
    ``reward/total`` → ``ray_echoink_reward_total``, labelled ``run`` with the run folder's name."""
    return "ray_" + _ray_name(key)


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        ray_metrics: bool = True,
        console: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.gauges: dict[str, Any] = {}
        self.ray_metrics = ray_metrics
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not console, dynamic_ncols=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.ray_metrics:
            self._to_ray(values)
        shown = {short: f"{values[key]:.3g}" for key, short in CONSOLE_KEYS if key in values}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(max(0, step - self.bar.n))

    def _to_ray(self, values: dict[str, float]) -> None:
        try:
            from ray.util.metrics import Gauge
        except ImportError:  # pragma: no cover - ray is a dependency
            return
        for key, value in values.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            gauge = self.gauges.get(key)
            if gauge is None:
                gauge = self.gauges[key] = Gauge(_ray_name(key), description=f"EchoInk {key}", tag_keys=("run",))
                gauge.set_default_tags({"run": self.run_dir.name})  # one series per run on a shared cluster
            gauge.set(float(value))

    def note(self, message: str) -> None:
        """A line above the progress bar; silent like the bar when the run has no console."""
        if not self.bar.disable:
            self.bar.write(message)

    def close(self) -> None:
        if self.file.closed:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN: keep it visible as a string
    return value
