"""Soak: the 562-step schedule on the tiny CPU config, with faults, against an uninterrupted run.

The soaked run has, in every window of 100 steps, one SIGKILL of a random actor (a rollout engine
or a learner rank) at a random step, recovered by automatic restarts (an engine in place, a learner
rank by a restart from the last checkpoint), and one stop (``--stop-after-steps``) and ``--resume``
at a random step. At the end:

- no question lost or duplicated: every step drew the questions the uninterrupted run drew;
- the final weights equal the uninterrupted run's (CPU runs are deterministic: to 1e-7);
- each role's resident memory flat after warm-up: per process, growth from its 50th step to its
  last sample at most 5 %.

Not in CI (it takes about an hour on the 2-core machine). Run from the repository root:

    python benchmarks/soak.py [--steps 562] [--seed 0] [--set key=value …]

It prints a table last and writes ``OUT`` (default benchmarks/records)/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

ROLES = {"RolloutEngine": "engine", "LearnerWorker": "learner"}
WARMUP_STEPS = 50
GROWTH_LIMIT = 0.05


def actor_pids(run: Path) -> dict[int, str]:
    """The live actors of the run in folder ``run`` and their role, from Ray's actor table: their
    Ray names start with the run folder's name (`orchestrator.placement.actor_name`), so actors
    of other runs on the same machine, or of this run's earlier attempts, are never counted."""
    import ray

    prefix = f"echoink-{run.name}-"
    return {
        int(actor["Pid"]): ROLES[actor["ActorClassName"]]
        for actor in ray._private.state.actors(actor_state_name="ALIVE").values()
        if actor["ActorClassName"] in ROLES and actor["Name"].startswith(prefix) and actor["Pid"]
    }


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


class Watch:
    """Kills the planned actors at their steps and samples every actor's resident memory, in a
    thread of its own, until ``stop`` is set."""

    def __init__(self, run_dir: Path, kills: dict[int, str], rng: random.Random) -> None:
        self.run_dir, self.kills, self.rng = run_dir, dict(kills), rng
        self.done: list[dict[str, Any]] = []
        self.memory: dict[int, list[tuple[int, float, str]]] = {}  # pid → (step, MiB, role)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            step = last_step(self.run_dir)
            pids = actor_pids(self.run_dir)
            for pid, role in pids.items():
                mb = rss_mb(pid)
                if mb is not None:
                    self.memory.setdefault(pid, []).append((step, mb, role))
            for planned in [s for s in self.kills if s <= step]:
                role = self.kills.pop(planned)
                victims = [pid for pid, r in pids.items() if r == role]
                if victims:
                    pid = self.rng.choice(victims)
                    os.kill(pid, signal.SIGKILL)
                    self.done.append({"planned_step": planned, "at_step": step, "role": role, "pid": pid})
                    print(f"[soak] step {step}: killed a {role} (pid {pid})", flush=True)
            time.sleep(1.0)


def weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    from orchestrator.checkpoint import list_checkpoints

    step, folder = list_checkpoints(run)[-1]
    out: dict[str, Any] = {"__step__": step}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def growth(memory: dict[int, list[tuple[int, float, str]]]) -> dict[str, dict[str, float]]:
    """Per role, the largest growth of one process's memory from its WARMUP_STEPS-th step on."""
    out: dict[str, dict[str, float]] = {}
    for pid, samples in memory.items():
        role = samples[0][2]
        first_step = samples[0][0]
        settled = [(s, mb) for s, mb, _ in samples if s >= first_step + WARMUP_STEPS]
        if len(settled) < 2 or settled[-1][0] - settled[0][0] < 50:
            continue  # a process that did not live 100 steps says nothing about growth
        rise = settled[-1][1] / settled[0][1] - 1
        best = out.setdefault(role, {"growth": -1.0, "pid": 0, "steps": 0, "mb_start": 0.0, "mb_end": 0.0})
        if rise > best["growth"]:
            out[role] = {"growth": rise, "pid": pid, "steps": settled[-1][0] - settled[0][0],
                         "mb_start": settled[0][1], "mb_end": settled[-1][1]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=562)
    parser.add_argument("--seed", type=int, default=0, help="chooses the kill steps and roles, and the stop")
    parser.add_argument("--every", type=int, default=100, help="one kill in every window of this many steps")
    parser.add_argument("--work", type=Path, default=Path("/tmp/echoink-soak"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    args = parser.parse_args(argv)

    import torch
    from common import start_ray

    from avqa.synth import DEMO_SPEC, synth_dataset
    from omni.fixtures.tiny import build_tiny_checkpoint
    from orchestrator.config import load_config
    from orchestrator.trainer import train

    work = args.work
    data = work / "data"
    if not (data / "train" / "omni_rl_format_train.json").is_file():
        synth_dataset(data, train=256, val=8, seed=0, spec=DEMO_SPEC)
    model = work / "tiny-omni"
    if not (model / "config.json").is_file():
        build_tiny_checkpoint(model, seed=0)
    start_ray()

    def config(out: Path):
        return load_config(REPO / "configs" / "tiny_cpu.yaml", [
            f"model_path={model}", f"output_dir={out}", f"total_steps={args.steps}",
            f"data.train={data / 'train' / 'omni_rl_format_train.json'}", "data.valid=null",
            "eval.at_start=false", "eval.at_end=false", "eval.every=0", "log.samples_every=0",
            "checkpoint.every=10", "checkpoint.keep_last=2", "faults.max_restarts=20",
            "faults.max_engine_restarts=20", "faults.collective_timeout_s=120", "sync.timeout_s=120", *args.set,
        ])

    rng = random.Random(args.seed)
    # one kill in every window, never past the last step; the roles alternate (a random first), so
    # both an engine and a learner rank die in any soak of two windows or more
    first = rng.randrange(2)
    windows = range(0, args.steps - 5, args.every)
    kills = {min(w + rng.randint(5, args.every - 5), args.steps - 1): ("engine", "learner")[(first + i) % 2]
             for i, w in enumerate(windows)}
    stop_at = rng.randint(args.steps // 4, 3 * args.steps // 4)
    print(f"[soak] kills {sorted(kills.items())}; stop and --resume after step {stop_at}", flush=True)

    started = time.perf_counter()
    straight = work / "straight"
    train(config(straight), console=False)
    straight_s = time.perf_counter() - started

    soaked = work / "soaked"
    watch = Watch(soaked, kills, rng)
    started = time.perf_counter()
    first = train(config(soaked), console=False, stop_after=stop_at)
    second = train(config(soaked), console=False, resume=True)
    soaked_s = time.perf_counter() - started
    watch.stop.set()
    watch.thread.join()

    def questions(run: Path) -> list[tuple[int, list[str]]]:
        rows = [json.loads(line) for line in (run / "questions.jsonl").read_text().splitlines() if line.strip()]
        return [(r["step"], r["ids"]) for r in rows]

    qa, qb = questions(straight), questions(soaked)
    lost_or_extra = sum(a != b for a, b in zip(qa, qb, strict=False)) + abs(len(qa) - len(qb))
    wa, wb = weights(straight), weights(soaked)
    keys = [k for k in wa if k != "__step__"]
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in keys) if wa.keys() == wb.keys() else float("inf")
    mem = growth(watch.memory)
    finite = all(torch.isfinite(wa[k].float()).all() for k in keys)
    rows = [
        ("steps (straight / soaked)", f"{len(qa)} / {len(qb)}; final checkpoints {wa['__step__']} / {wb['__step__']}"),
        ("wall clock (straight / soaked)", f"{straight_s / 60:.1f} / {soaked_s / 60:.1f} min"),
        ("kills", ", ".join(f"{k['role']}@{k['at_step']}" for k in watch.done) or "none"),
        ("automatic restarts (learner)", f"{second.get('restarts', 0)} (first call: {first.get('restarts', 0)})"),
        ("engine restarts", f"{second['last'].get('faults/engine_restarts', 0):g}"),
        ("stop and --resume", f"after step {stop_at}"),
        ("steps whose questions differ", str(lost_or_extra)),
        ("final weights, max |Δ|", f"{worst:.3g} (finite: {finite})"),
        *[(f"memory growth, {role}", f"{g['growth'] * 100:+.1f} % ({g['mb_start']:.0f} → {g['mb_end']:.0f} MiB over "
           f"{g['steps']} steps, pid {g['pid']})") for role, g in sorted(mem.items())],
    ]
    ok = lost_or_extra == 0 and worst <= 1e-7 and finite and all(g["growth"] <= GROWTH_LIMIT for g in mem.values())
    width = max(len(k) for k, _ in rows)
    print(f"\n== soak on CPU ({time.strftime('%Y-%m-%d')})")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"{'verdict':<{width}}  {'PASS' if ok else 'FAIL'}")
    out = Path(os.environ.get("OUT", REPO / "benchmarks" / "records"))
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "soak", "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "seed": args.seed,
              "overrides": args.set, "kills": watch.done, "stop_at": stop_at, "rows": rows, "memory": mem, "pass": ok}
    (out / "soak.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
