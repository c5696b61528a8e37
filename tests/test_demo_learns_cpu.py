"""The embedded default learns the task: `make demo` itself, end to end, on the demo's sizes.

Synthetic data (56-pixel images, 1-second tones) → random tiny checkpoint → supervised warm start
(format only, random letter) → GRPO with the real rewards (configs/tiny_cpu.yaml) → evaluation
with the modality ablation. The trained policy must beat its own warm start on the same
validation questions by more than the sampling noise of that many questions, and lose accuracy
when either medium is taken away.

This is CI's only run of the recipe (`.ci/run` is `make install` + `make test`): the test runs the
repository's `make demo` — which builds data/synth/ and checkpoints/tiny-omni*/ where missing, as
for a user — with only the run folder moved to a temporary one (`DEMO_SET`), so repeated runs
leave a user's runs/ alone, and asserts on that run folder.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the virtualenv running this test; `make demo` uses its tools


def run_make_demo(run_dir: Path, timeout_s: float = 2400, target: str = "demo") -> str:
    """`make demo` (or another demo ``target``) with its run folder in ``run_dir``; its output
    (stdout and stderr) is printed, so pytest shows it with a failure, and returned."""
    # a fresh local Ray, as for a user typing `make demo`: never a cluster this process knows of
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [
        "make", "--no-print-directory", "-C", str(REPO),
        # the venv exists (this test runs in it): never let a newer Makefile reinstall it mid-test
        "-o", str(VENV / ".installed-cpu"),
        f"VENV={VENV}", target, f"DEMO_SET=--set output_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # make, echoink and the local Ray it started
        output, _ = proc.communicate()
        print(output)
        pytest.fail(f"make {target} did not finish within {timeout_s:.0f} s (its output is above)")
    print(output)
    assert proc.returncode == 0, f"make {target} failed (exit {proc.returncode}); its output is above:\n{output[-4000:]}"
    return output


@pytest.mark.slow
def test_demo_recipe_beats_its_warm_start(tmp_path) -> None:
    from chromium import open_page

    from orchestrator.config import load_config
    from watch.report import build_report
    from watch.samples import read_samples

    run_dir = tmp_path / "run"
    output = run_make_demo(run_dir)
    assert f"run folder:   {run_dir}" in output

    config = load_config(run_dir / "config.yaml")  # the config the run resolved, as it ran
    assert config.output_dir == run_dir
    warm = json.loads((config.model_path / "warmstart.json").read_text())
    assert warm["nll_last"] < 0.5 * warm["nll_first"], warm  # the format was learnt

    summary = json.loads((run_dir / "summary.json").read_text())
    start, end, gain = summary["eval_start"], summary["eval"], summary["eval_gain"]
    n = gain["questions"]
    assert n == 64
    # after the warm start: the format, not the answer
    assert start["eval/format_rate"] >= 0.9, start
    assert start["eval/accuracy"] <= 0.45, start
    # sampling noise of a difference of two accuracies on n questions: two standard errors at p = 0.5
    noise = 2 * math.sqrt(2 * 0.25 / n)
    assert gain["accuracy_end"] - gain["accuracy_start"] > noise, gain
    assert gain["mcnemar_p"] < 0.01, gain
    # both media are used: taking either away costs accuracy
    assert end["eval/ablate_audio/accuracy"] < end["eval/accuracy"], end
    assert end["eval/ablate_image/accuracy"] < end["eval/accuracy"], end
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == config.total_steps
    assert sum(r["reward/format"] for r in rows[-10:]) / 10 > 0.8  # the format survived the training
    # the samples (log.samples_every: 50 by default) show the answers it learnt, and the run's page
    # opens in a browser with its pictures and sounds (the e2e test checks the page in detail)
    samples = read_samples(run_dir)
    assert sorted({r["step"] for r in samples}) == [1, 50, 100, 150]
    last = [r for r in samples if r["step"] == 150]
    assert len(last) == 4 and sum(r["rewards"]["accuracy"] for r in last) >= 3, last
    seen = open_page(build_report(run_dir), tmp_path / "browser")
    assert len(seen["audio"]) == len(samples) and all(a["duration"] > 0.9 for a in seen["audio"]), seen["audio"]
    assert all(i["loaded"] for i in seen["images"]) and len(seen["images"]) > len(samples), seen["images"]
