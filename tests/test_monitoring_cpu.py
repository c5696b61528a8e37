"""Watching a run: actor names, the Grafana dashboard generated from the metric table, and the
Prometheus configuration the head node runs. A real Prometheus scraping a real run, and the
dashboard's charts queried against it, are in tests/test_train_cluster_cpu.py."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import yaml

from omni.actorrepr import actor_repr
from omni.metric_table import is_known
from orchestrator.placement import Placement, actor_name, run_label
from watch import monitoring
from watch.metrics_log import prometheus_name
from watch.monitoring import (
    DASHBOARD_FILE,
    PANELS,
    Panel,
    Series,
    check_panels,
    dashboard_json,
    dashboard_metrics,
    grafana_dashboard,
    prometheus_config,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_committed_dashboard_is_the_generated_one() -> None:
    assert DASHBOARD_FILE.read_text(encoding="utf-8") == dashboard_json(), (
        "docker/grafana/echoink_dashboard.json is stale: run `python -m watch.monitoring dashboard`"
    )


def test_the_dashboard_names_only_metrics_a_run_exports() -> None:
    check_panels()
    names = dashboard_metrics(json.loads(DASHBOARD_FILE.read_text(encoding="utf-8")))
    ours = {n for n in names if n.startswith("ray_echoink_")}
    table = {s.metric for p in PANELS for s in p.series if not s.expr}
    assert all(is_known(m) for m in table)
    assert ours == {prometheus_name(m) for m in table}
    # Ray's own metrics: names its node reporter exports (ray_ + the gauge's name)
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    assert names - ours == {"ray_component_rss_mb", "ray_component_gpu_memory_mb"}
    assert {n.removeprefix("ray_") for n in names - ours} <= set(METRICS_GAUGES)
    assert prometheus_name("reward/total") == "ray_echoink_reward_total"
    assert prometheus_name("mismatch/logprob_abs_error") == "ray_echoink_mismatch_logprob_abs_error"


def test_the_dashboard_has_the_panels_a_run_is_watched_by() -> None:
    board = grafana_dashboard()
    titles = [p["title"] for p in board["panels"]]
    for wanted in ("Reward", "Accuracy", "Format", "Completion length", "KL to the reference", "Entropy", "Step time",
                   "Throughput", "GPU memory per role", "Host memory per role", "Learner vs sampler"):
        assert wanted in titles
    steps = next(p for p in board["panels"] if p["title"] == "Step time")
    assert [t["expr"] for t in steps["targets"]][:2] == [
        'max by (run) (ray_echoink_timing_rollout_s{run=~"$run"})',
        'max by (run) (ray_echoink_timing_reward_s{run=~"$run"})',
    ]
    assert steps["targets"][0]["legendFormat"] == "{{run}} rollout" and steps["fieldConfig"]["defaults"]["unit"] == "s"
    ids = [p["id"] for p in board["panels"]]
    assert len(set(ids)) == len(ids)
    places = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in board["panels"]}
    assert len(places) == len(ids)  # no panel hides another
    run = next(v for v in board["templating"]["list"] if v["name"] == "run")
    assert run["definition"] == "label_values(ray_echoink_timing_step_s, run)" and run["includeAll"]
    memory = next(p for p in board["panels"] if p["title"] == "GPU memory per role")
    assert "gpu runs only" in memory["description"]


def test_a_series_of_no_metric_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Typo: timing/stepp_s"):
        check_panels([Panel("Typo", (Series("timing/stepp_s"),))])
    check_panels([Panel("Placeholders", (Series("reward/format"), Series("eval/ablate_audio/accuracy")))])


def test_prometheus_scrapes_what_ray_lists(tmp_path) -> None:
    config = yaml.safe_load(prometheus_config(tmp_path / "prom_metrics_service_discovery.json", "1s"))
    assert config["global"]["scrape_interval"] == "1s"
    assert config["scrape_configs"] == [
        {"job_name": "ray", "file_sd_configs": [{"files": [str(tmp_path / "prom_metrics_service_discovery.json")]}]}
    ]


def test_a_missing_program_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(FileNotFoundError, match=r"prometheus is not installed .*apt-get install -y --no-install-recommends prometheus"):
        monitoring.find_binary("prometheus")
    with pytest.raises(FileNotFoundError, match=r"grafana is not installed .*apt\.grafana\.com"):
        monitoring.find_binary("grafana")


def test_actor_names_carry_the_run_and_a_fresh_id() -> None:
    label = run_label("/data/runs/My run (7b)/")
    assert re.fullmatch(r"My-run-7b-[0-9a-f]{4}", label)
    assert len({run_label("runs/x") for _ in range(8)}) > 1  # a fresh id per run (per attempt after a fault)
    assert re.fullmatch(r"a{32}-[0-9a-f]{4}", run_label("a" * 80))
    assert actor_name("tiny-1a2b", "learner", 1) == "echoink-tiny-1a2b-learner-1"
    assert actor_name("echoink-r1-7b-1a2b", "engine", 0) == "echoink-r1-7b-1a2b-engine-0"  # said once


def test_a_restarted_engine_gets_a_name_of_its_own() -> None:
    planned = {"num_cpus": 1, "name": "echoink-tiny-1a2b-engine-0"}
    placement = Placement(use_gpus=False, engine_options=[planned], learner_options=[{"name": "echoink-tiny-1a2b-learner-0"}],
                          groups=[], label="tiny-1a2b")
    names = [placement.engine_start_options(0)["name"] for _ in range(3)]
    assert names == ["echoink-tiny-1a2b-engine-0", "echoink-tiny-1a2b-engine-0-restart-1", "echoink-tiny-1a2b-engine-0-restart-2"]
    assert placement.engine_options[0] == planned  # the plan itself is unchanged
    record = placement.record([{"index": 0, "gpus": []}], [{"rank": 0}])
    assert record["engines"][0]["actor"] == "echoink-tiny-1a2b-engine-0"
    assert record["learner_ranks"][0]["actor"] == "echoink-tiny-1a2b-learner-0"
    unnamed = Placement(use_gpus=False, engine_options=[{"num_cpus": 1}], learner_options=[], groups=[])
    first, restart = unnamed.engine_start_options(0), unnamed.engine_start_options(0)  # the second call: a restart
    assert "name" not in first and "name" not in restart


def test_an_actor_repr_says_role_node_devices_and_state() -> None:
    assert actor_repr("engine 3", "weights v7") == f"engine 3 @ {socket.gethostname()} [cpu] weights v7"


def test_the_readme_says_what_prometheus_serves() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "`ray_echoink_reward_total`" in readme and "python -m watch.monitoring start" in readme
    assert "is exported as `echoink_" not in readme
