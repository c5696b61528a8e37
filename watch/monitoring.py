"""Prometheus and Grafana on a Ray cluster's head node, and EchoInk's Grafana dashboard.

Ray serves every process's metrics (EchoInk's ``ray_echoink_*``, see `watch.metrics_log`, and
Ray's own ``ray_*``) on each node's metrics export port, and its dashboard keeps a list of those
ports, a file for Prometheus's file-based service discovery (``<ray temp>/prom_metrics_service_
discovery.json``). The dashboard also writes a Grafana configuration for the session
(``<ray temp>/session_latest/metrics/grafana/``: anonymous viewers, embedding allowed, the
Prometheus datasource at RAY_PROMETHEUS_HOST, Ray's own dashboards), and its Metrics tab shows
Grafana's charts once Grafana answers at RAY_GRAFANA_HOST. ``start`` runs both programs on the head
against those files, on the head's loopback (like the dashboard: reach them through SSH), and adds
EchoInk's dashboard, which is generated from the metric table (`omni.metric_table`) by
:func:`grafana_dashboard` so that it names only metrics a run exports::

    python -m watch.monitoring start        # on the head, after `ray start --head`
    python -m watch.monitoring stop
    python -m watch.monitoring dashboard    # rewrite docker/grafana/echoink_dashboard.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omni.metric_table import is_known
from watch.metrics_log import prometheus_name

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_FILE = REPO / "docker" / "grafana" / "echoink_dashboard.json"
DASHBOARD_UID = "echoink"
RAY_TEMP = Path("/tmp/ray")  # Ray's default --temp-dir
DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
PROMETHEUS_PORT, GRAFANA_PORT = 9090, 3000  # the ports Ray's dashboard expects by default
INSTALL = {
    "prometheus": "apt-get install -y --no-install-recommends prometheus (.ci/run and docker/Dockerfile do)",
    "grafana": "install Grafana OSS from https://apt.grafana.com (docker/Dockerfile does)",
}

# ---------------------------------------------------------------------------------- the dashboard
# Ray names a worker process's memory series after its process title: ray::<actor class>[.<method>]
ENGINES, LEARNERS = 'Component=~"ray::RolloutEngine.*"', 'Component=~"ray::LearnerWorker.*"'


@dataclass(frozen=True)
class Series:
    """One line of a panel: an EchoInk metric (a name of the metric table) or, with ``expr``, a
    PromQL expression over Ray's own metrics. ``only`` says when a run exports it ("" = always)."""

    metric: str
    legend: str = ""
    expr: str = ""
    only: str = ""  # "gpu", "colocated gpu", "eval": the runs that export it

    def promql(self) -> str:
        if self.expr:
            return self.expr
        # one line per run; a run resumed by a new driver briefly has two series of one run
        return f'max by (run) ({prometheus_name(self.metric)}{{run=~"$run"}})'

    def legend_format(self) -> str:
        return self.legend if self.expr else "{{run}} " + (self.legend or self.metric)


@dataclass(frozen=True)
class Panel:
    """One chart of the dashboard: its lines share a unit."""

    title: str
    series: tuple[Series, ...]
    unit: str = "none"
    description: str = ""


def _ray_memory(metric: str, selector: str, legend: str, only: str = "") -> Series:
    return Series(metric, legend, expr=f"sum({metric}{{{selector}}}) / 1024", only=only)


PANELS: tuple[Panel, ...] = (
    Panel("Reward", (Series("reward/total", "total (weighted)"),), description="mean reward of the step's completions"),
    Panel("Accuracy", (Series("reward/accuracy", "train"), Series("eval/accuracy", "validation", only="eval")),
          unit="percentunit"),
    Panel("Format", (Series("reward/format", "train"), Series("eval/format_rate", "validation", only="eval")),
          unit="percentunit", description="share of completions in the think/answer format"),
    Panel("Completion length", (Series("completion_length/mean", "mean"), Series("completion_length/max", "max")),
          description="tokens"),
    Panel("KL to the reference", (Series("kl"),), description="mean per-token KL of the policy to the reference model"),
    Panel("Entropy", (Series("entropy"),), description="mean token entropy of the policy (nats)"),
    Panel("Step time", (
        Series("timing/rollout_s", "rollout"), Series("timing/reward_s", "rewards"), Series("timing/learn_s", "learn"),
        Series("timing/weight_sync_s", "weight push"), Series("timing/sleep_s", "engines sleep", only="colocated gpu"),
        Series("timing/wake_s", "engines wake", only="colocated gpu"), Series("timing/step_s", "whole step"),
    ), unit="s"),
    Panel("Throughput", (Series("throughput/rollout_tokens_per_s", "rollout"),
                         Series("throughput/learner_tokens_per_s", "learner")), description="tokens per second"),
    Panel("GPU memory per role", (
        Series("memory/learner_peak_gb", "learner rank peak", only="gpu"),
        Series("memory/learner_held_gb", "learner rank held after its step", only="gpu"),
        Series("memory/gpu_used_awake_gb", "engine GPU awake", only="colocated gpu"),
        Series("memory/gpu_used_asleep_gb", "engine GPU asleep", only="colocated gpu"),
        _ray_memory("ray_component_gpu_memory_mb", ENGINES, "engines (all runs)", only="gpu"),
        _ray_memory("ray_component_gpu_memory_mb", LEARNERS, "learner ranks (all runs)", only="gpu"),
    ), unit="gbytes"),
    Panel("Host memory per role", (
        _ray_memory("ray_component_rss_mb", ENGINES, "engines (all runs)"),
        _ray_memory("ray_component_rss_mb", LEARNERS, "learner ranks (all runs)"),
    ), unit="gbytes", description="resident memory of the processes of each role, summed"),
    Panel("Learner vs sampler", (
        Series("mismatch/token_prob_error", "|p learner − p vLLM|"),
        Series("mismatch/logprob_abs_error", "|log p learner − log p vLLM|"),
        Series("rollout_correction/kl", "KL(vLLM ‖ learner)"),
    ), description="the same sampled tokens scored by the learner and by vLLM: near 0 when both compute the same model"),
    Panel("Loss and gradient norm", (Series("loss"), Series("grad_norm", "gradient norm"))),
    Panel("Faults", (
        Series("faults/engine_restarts", "engine restarts"), Series("learner/skipped_steps", "skipped steps"),
        Series("data/bad_records", "bad records"), Series("faults/checkpoint_failures", "checkpoint failures"),
    ), description="counts so far in the run"),
)


def grafana_dashboard(panels: Sequence[Panel] = PANELS) -> dict[str, Any]:
    """The Grafana dashboard (JSON model): two panels a row, a ``run`` variable (the run folder
    names the runs exported), the datasource a variable like Ray's own dashboards'."""
    source = {"type": "prometheus", "uid": "${datasource}"}
    out = []
    for i, panel in enumerate(panels):
        notes = sorted({s.only for s in panel.series if s.only})
        description = "; ".join([panel.description] * bool(panel.description)
                                + [f"{o} runs only: {', '.join(s.legend or s.metric for s in panel.series if s.only == o)}"
                                   for o in notes])
        out.append({
            "id": i + 1,
            "type": "timeseries",
            "title": panel.title,
            "description": description,
            "datasource": source,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {
                "defaults": {"unit": panel.unit, "custom": {"drawStyle": "line", "lineWidth": 1, "spanNulls": True}},
                "overrides": [],
            },
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "none"}},
            "targets": [
                {"refId": chr(ord("A") + j), "datasource": source, "expr": s.promql(), "legendFormat": s.legend_format()}
                for j, s in enumerate(panel.series)
            ],
        })
    runs = f"label_values({prometheus_name('timing/step_s')}, run)"
    return {
        "uid": DASHBOARD_UID,
        "title": "EchoInk",
        "description": "EchoInk training runs: generated by `python -m watch.monitoring dashboard` from omni/metric_table.py",
        "tags": ["echoink"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "graphTooltip": 1,
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "hide": 0,
             "current": {}, "options": [], "refresh": 1, "regex": ""},
            {"name": "run", "label": "Run", "type": "query", "datasource": source, "definition": runs,
             "query": {"query": runs, "refId": "StandardVariableQuery"}, "refresh": 2, "includeAll": True,
             "multi": True, "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
             "options": [], "sort": 1, "hide": 0, "regex": ""},
        ]},
        "panels": out,
    }


def dashboard_json() -> str:
    """The text of docker/grafana/echoink_dashboard.json (a test holds the file to it)."""
    return json.dumps(grafana_dashboard(), indent=2, ensure_ascii=False) + "\n"


def check_panels(panels: Sequence[Panel] = PANELS) -> None:
    """Every EchoInk series names a metric of the table (a typo would chart nothing, silently)."""
    wrong = [f"{p.title}: {s.metric}" for p in panels for s in p.series if not s.expr and not is_known(s.metric)]
    if wrong:
        raise ValueError(f"dashboard series not in omni/metric_table.py's table: {wrong}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (every selector here has ``{…}``)."""
    return set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", expr))


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    """The metric names a dashboard's queries select."""
    return {name for p in dashboard["panels"] for t in p["targets"] for name in metric_names(t["expr"])}


# ---------------------------------------------------------------------------------- the programs
def find_binary(name: str) -> str:
    """The program on PATH, or an error that says how to install it."""
    found = shutil.which(name) or (shutil.which("grafana-server") if name == "grafana" else None)
    if not found:
        raise FileNotFoundError(f"{name} is not installed (not on PATH): {INSTALL[name]}")
    return found


def prometheus_config(discovery_file: Path, scrape_interval: str = "10s") -> str:
    """Ray's own Prometheus configuration (what `ray metrics launch-prometheus` runs), with the
    discovery file of this Ray's temp folder and the scrape interval as given."""
    return (
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
        f"scrape_configs:\n- job_name: ray\n  file_sd_configs:\n  - files: ['{discovery_file}']\n"
    )


def start_prometheus(
    ray_temp: Path, folder: Path, *, port: int = PROMETHEUS_PORT, scrape_interval: str = "10s", wait_s: float = 60
) -> subprocess.Popen[bytes]:
    """Prometheus on 127.0.0.1:``port``, scraping every node Ray lists, its data and log in
    ``folder``; returns once it answers queries (waiting up to ``wait_s`` for Ray's list)."""
    binary = find_binary("prometheus")
    discovery = _wait_for(ray_temp / DISCOVERY_FILE, wait_s)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(prometheus_config(discovery, scrape_interval), encoding="utf-8")
    command = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    proc = _spawn(command, folder / "prometheus.log")
    _wait_ready(proc, f"http://127.0.0.1:{port}/api/v1/query?query=vector(1)", folder / "prometheus.log")
    return proc


def start_grafana(ray_temp: Path, folder: Path, *, port: int = GRAFANA_PORT) -> subprocess.Popen[bytes]:
    """Grafana on 127.0.0.1:``port`` with the configuration Ray's dashboard wrote for this
    session (Ray's dashboards, the Prometheus datasource) and EchoInk's dashboard beside them."""
    binary = find_binary("grafana")
    ini = _wait_for(ray_temp / "session_latest" / "metrics" / "grafana" / "grafana.ini")
    session = ini.resolve().parent
    # a second dashboard provider next to Ray's: the repository's folder, read where it lies
    (session / "provisioning" / "dashboards" / "echoink.yml").write_text(
        "apiVersion: 1\nproviders:\n  - name: EchoInk\n    folder: EchoInk\n    type: file\n"
        f"    options:\n      path: {DASHBOARD_FILE.parent}\n",
        encoding="utf-8",
    )
    folder.mkdir(parents=True, exist_ok=True)
    home = next((p for p in (Path("/usr/share/grafana"), Path(binary).resolve().parent.parent) if (p / "conf").is_dir()), None)
    command = [binary, *(["server"] if Path(binary).name == "grafana" else []), f"--config={ini}",
               *([f"--homepath={home}"] if home else [])]
    env = {"GF_SERVER_HTTP_ADDR": "127.0.0.1", "GF_SERVER_HTTP_PORT": str(port),
           "GF_PATHS_DATA": str(folder / "data"), "GF_PATHS_LOGS": str(folder)}
    proc = _spawn(command, folder / "grafana.log", env)
    _wait_ready(proc, f"http://127.0.0.1:{port}/api/health", folder / "grafana.log")
    return proc


def _wait_for(path: Path, timeout_s: float = 60) -> Path:
    """A file the head's dashboard writes once it has started (`ray start` may return before)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"{path} did not appear within {timeout_s:.0f} s: is Ray's head running, with its dashboard?")
        time.sleep(0.5)
    return path


def _spawn(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # a session of its own: it outlives the SSH command of `ray up` that started it
    with log.open("ab") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError), \
                urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{proc.args[0]} did not answer {url} within {timeout_s:.0f} s: {log.read_text()[-2000:]}")


def stop(folder: Path, timeout_s: float = 30) -> list[str]:
    """Stop the programs `start` left running (by the process ids it wrote, nothing else) and
    wait until they are gone: a new start binds the same ports."""
    stopped: dict[str, int] = {}
    for pid_file in sorted(folder.glob("*.pid")):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            stopped[pid_file.stem] = pid
        pid_file.unlink()
    deadline = time.monotonic() + timeout_s
    for pid in stopped.values():
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    return list(stopped)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m watch.monitoring", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("start", "stop"):
        one = sub.add_parser(name)
        one.add_argument("--dir", type=Path, default=Path.home() / "echoink-monitoring", help="data, logs, process ids")
        one.add_argument("--ray-temp", type=Path, default=RAY_TEMP, help="Ray's --temp-dir")
    start = sub.choices["start"]
    start.add_argument("--prometheus-port", type=int, default=PROMETHEUS_PORT)
    start.add_argument("--grafana-port", type=int, default=GRAFANA_PORT)
    start.add_argument("--scrape-interval", default="10s")
    dash = sub.add_parser("dashboard")
    dash.add_argument("--out", type=Path, default=DASHBOARD_FILE)
    args = parser.parse_args(argv)
    if args.command == "dashboard":
        check_panels()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(dashboard_json(), encoding="utf-8")
        print(f"wrote {args.out}")
        return 0
    if args.command == "stop":
        print("stopped:", ", ".join(stop(args.dir)) or "nothing")
        return 0
    stop(args.dir)  # a head restarted by `ray up` starts them again
    prometheus = start_prometheus(args.ray_temp, args.dir / "prometheus", port=args.prometheus_port,
                                  scrape_interval=args.scrape_interval)
    (args.dir / "prometheus.pid").write_text(str(prometheus.pid))
    grafana = start_grafana(args.ray_temp, args.dir / "grafana", port=args.grafana_port)
    (args.dir / "grafana.pid").write_text(str(grafana.pid))
    print(f"Prometheus on 127.0.0.1:{args.prometheus_port}, Grafana on 127.0.0.1:{args.grafana_port} "
          f"(dashboards: Ray, EchoInk); logs in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
