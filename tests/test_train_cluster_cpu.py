"""Training on Ray clusters: two nodes (engines on one, learners on the other) and `ray job submit`
with a config's relative paths (the path rule: `orchestrator.paths.with_absolute_paths`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import typing
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from pydantic import BaseModel
from test_train_e2e_cpu import tiny_config

from orchestrator.config import ConfigError, RunConfig, dump_config, load_config
from orchestrator.paths import with_absolute_paths

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# every path-valued key of the run config, listed by hand: a new one must be added here (and so to
# the test of the path rule below), whatever its default
PATH_KEYS = {"model_path", "output_dir", "data.train", "data.valid", "data.media_root"}


def _mentions_path(annotation) -> bool:
    return annotation is Path or any(_mentions_path(a) for a in typing.get_args(annotation))


def _annotated_path_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys |= _annotated_path_keys(field.annotation, f"{prefix}{name}.")
        elif _mentions_path(field.annotation):
            keys.add(prefix + name)
    return keys


def _get(config: RunConfig, key: str):
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_every_path_key_is_listed() -> None:
    assert _annotated_path_keys(RunConfig) == PATH_KEYS


def test_relative_paths_become_absolute_against_the_start_directory(tmp_path, monkeypatch) -> None:
    relative = {key: Path("in") / key.replace(".", "-") for key in PATH_KEYS}
    config = load_config(None, [f"{key}={value}" for key, value in relative.items()])
    for key in PATH_KEYS - {"output_dir"}:  # inputs must exist; the run folder need not
        (tmp_path / relative[key]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative[key]).touch()
    monkeypatch.chdir(tmp_path)  # default base: where the command started
    resolved = with_absolute_paths(config)
    changed = {k for k in PATH_KEYS if _get(resolved, k) != _get(config, k)}
    assert changed == PATH_KEYS
    for key in PATH_KEYS:
        assert _get(resolved, key) == tmp_path / relative[key], key
        assert _get(config, key) == relative[key], key  # a copy: the given config is unchanged
    # absolute paths stay as they are; an explicit base wins over the current directory
    assert with_absolute_paths(resolved, tmp_path / "elsewhere") == resolved
    other = tmp_path / "other"
    assert with_absolute_paths(config, other, must_exist=()).model_path == other / relative["model_path"]
    # null optional paths stay null
    assert with_absolute_paths(load_config(None, ["data.valid=null"]), must_exist=()).data.valid is None


def test_a_missing_path_names_the_key_the_given_path_and_the_path_tried(tmp_path) -> None:
    config = load_config(None, ["model_path=checkpoints/none", "data.train=data/none.json", "output_dir=runs/new"])
    with pytest.raises(ConfigError) as info:
        with_absolute_paths(config, tmp_path, must_exist=("model_path", "data.train", "output_dir"))
    message = str(info.value)
    assert f"model_path: 'checkpoints/none' does not exist (tried {tmp_path / 'checkpoints' / 'none'})" in message
    assert f"data.train: 'data/none.json' does not exist (tried {tmp_path / 'data' / 'none.json'})" in message
    assert "output_dir: 'runs/new'" in message
    assert "working_dir" not in message  # no Ray package hint outside one
    with pytest.raises(ValueError, match="'data.test' is not a path key"):
        with_absolute_paths(config, tmp_path, must_exist=("data.test",))
    # by default every path but output_dir must exist
    with pytest.raises(ConfigError) as info:
        with_absolute_paths(config, tmp_path)
    assert "data.valid:" in str(info.value) and "output_dir" not in str(info.value)


def test_inside_an_uploaded_working_dir_the_error_and_warning_say_why(tmp_path) -> None:
    package = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    package.mkdir(parents=True)
    config = load_config(None, ["model_path=checkpoints/tiny", "data.valid=null", "output_dir=runs/job"])
    with pytest.raises(ConfigError, match=r'package|working_dir') as info:
        with_absolute_paths(config, package)
    assert f"tried {package / 'checkpoints' / 'tiny'}" in str(info.value)
    assert 'submit with --working-dir "local://$PWD"' in str(info.value)
    with pytest.warns(UserWarning, match=r"output_dir 'runs/job' is .*_ray_pkg_0123abcd.*--resume would not find"):
        with_absolute_paths(config, package, must_exist=())


def test_a_path_key_the_walk_cannot_handle_is_refused() -> None:
    class WithPathList(RunConfig):
        extra_media: list[Path] = []

    with pytest.raises(TypeError, match="extra_media"):
        with_absolute_paths(WithPathList(), must_exist=())


def test_eval_checkpoint_is_resolved_and_checked(synth_dir, tmp_path, monkeypatch, capsys) -> None:
    from echoink.cli import main

    monkeypatch.chdir(tmp_path)
    valid = synth_dir / "valid" / "omni_rl_format_valid.json"
    assert main(["eval", "--checkpoint", "ckpt/none", "--set", f"data.valid={valid}"]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint: 'ckpt/none' does not exist (tried {tmp_path / 'ckpt' / 'none'})" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_engines_and_learners_on_different_nodes(tiny_checkpoint, synth_dir, tmp_path) -> None:
    out = tmp_path / "run"
    script = tmp_path / "multinode.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import json, sys
            sys.path.insert(0, {str(REPO / 'tests')!r})
            if __name__ == "__main__":
                from ray.cluster_utils import Cluster
                from pathlib import Path
                from test_train_e2e_cpu import tiny_config
                from orchestrator.trainer import train
                cluster = Cluster(initialize_head=True, connect=True,
                                  head_node_args={{"num_cpus": 2, "resources": {{"rollout_node": 4}}}})
                cluster.add_node(num_cpus=3, resources={{"learner_node": 4}})
                cluster.wait_for_nodes()
                config = tiny_config(Path({str(tiny_checkpoint)!r}), Path({str(synth_dir)!r}), Path({str(out)!r}),
                                     "total_steps=2", "checkpoint.every=0",
                                     "rollout.resources={{rollout_node: 1}}",
                                     "learner.resources={{learner_node: 1}}")
                summary = train(config, console=False)
                print("SUMMARY", json.dumps({{"steps": summary["steps"]}}))
                import ray
                ray.shutdown()
                cluster.shutdown()
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 'SUMMARY {"steps": 2}' in proc.stdout
    placement = json.loads((out / "placement.json").read_text())
    engine_nodes = {e["node_id"] for e in placement["engines"]}
    learner_nodes = {r["node_id"] for r in placement["learner_ranks"]}
    assert len(engine_nodes) == 1 and len(learner_nodes) == 1
    assert engine_nodes.isdisjoint(learner_nodes)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head of its own (`ray start --block` in a new session), its dashboard and job API on
    loopback. Stopped by signalling its process group: `ray stop` would stop every Ray here."""
    tmp_path = tmp_path_factory.mktemp("ray-head")
    port, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray 2.60 turns token authentication on for new clusters; clients must say so to send the token
    env["RAY_AUTH_MODE"] = "token"
    # Ray's processes send their metrics to the node's exporter every 10 s by default: a two-step
    # run may end between two reports, so here every second (Prometheus scrapes every second too)
    env["RAY_metrics_report_interval_ms"] = "1000"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `echoink` for a job's entrypoint, as in the image
    temp = Path("/tmp") / f"ray-job-{os.getpid()}"
    start = [
        str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4", "--block",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
        "--include-dashboard=true", "--disable-usage-stats",
        # the agents' default ports are fixed: another Ray on this machine (the suite's own) holds them,
        # and a head whose job agent cannot bind answers every submit with "No available agent"
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
    ]
    # the head (its raylet, so every worker and actor without a working_dir) runs in a folder of its own:
    # a relative path that reached an actor unresolved would name a file there, not the user's
    head_cwd = tmp_path / "head-cwd"
    head_cwd.mkdir()
    log = tmp_path / "ray-head.log"  # shown when the job API does not come up
    with log.open("w") as sink:
        head = subprocess.Popen(start, env=env, cwd=head_cwd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dash}", head_cwd, env, log, temp
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            try:
                head.wait(timeout=60)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # stragglers of the group
        shutil.rmtree(temp, ignore_errors=True)


def a_checkout(root: Path, tiny_checkpoint: Path, synth_dir: Path) -> Path:
    """A folder laid out as this repository is after `make demo`: configs/ tracked; data/,
    checkpoints/ and runs/ ignored by the repository's own .gitignore; a config with relative paths."""
    project = root / "checkout"
    (project / "configs").mkdir(parents=True)
    shutil.copyfile(REPO / ".gitignore", project / ".gitignore")
    shutil.copytree(synth_dir, project / "data" / "synth")
    shutil.copytree(tiny_checkpoint, project / "checkpoints" / "tiny")
    config = tiny_config(Path("checkpoints/tiny"), Path("data/synth"), Path("runs/job"), "total_steps=2", "checkpoint.every=0")
    text = dump_config(config)
    assert "model_path: checkpoints/tiny\n" in text and "output_dir: runs/job\n" in text  # relative, as a user writes them
    (project / "configs" / "job.yaml").write_text(text)
    return project


@pytest.fixture(scope="module")
def prometheus(ray_head, tmp_path_factory):
    """A real Prometheus (Debian's package; .ci/run installs it) scraping the head as it does on a
    cluster's head node (watch.monitoring.start_prometheus), every second. Without one,
    the error (which says how to install it): the test that queries it fails, the others run."""
    from watch.monitoring import start_prometheus

    port = free_port()
    try:
        proc = start_prometheus(ray_head[4], tmp_path_factory.mktemp("prometheus"), port=port, scrape_interval="1s",
                                wait_s=300)
    except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
        yield exc
        return
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def submitted(ray_head, prometheus, tiny_checkpoint, synth_dir, tmp_path_factory):
    """Jobs as a user submits them (two that fail early, one `make submit`), then a two-step run
    started in the checkout; their outputs, the run's window and the head's address."""
    dashboard, head_cwd, env, head_log, _ = ray_head
    root = tmp_path_factory.mktemp("job-submit")
    project = a_checkout(root, tiny_checkpoint, synth_dir)
    for _ in range(90):  # the job API comes up a little after `ray start` returns
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard], capture_output=True, env=env)
        if probe.returncode == 0:
            break
        time.sleep(2)
    assert probe.returncode == 0, (probe.stderr[-2000:], head_log.read_text()[-3000:])

    def until_an_agent(command: list[str]) -> subprocess.CompletedProcess:
        for _ in range(30):
            proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=project)
            # the job agent on the node starts a little after the job API: nothing was submitted yet
            if proc.returncode == 0 or "No available agent" not in proc.stderr + proc.stdout:
                return proc
            time.sleep(2)
        return proc

    def submit(*args: str) -> subprocess.CompletedProcess:
        return until_an_agent([str(BIN / "ray"), "job", "submit", "--address", dashboard, *args])

    train = [str(BIN / "echoink"), "train", "--config", "configs/job.yaml"]
    out: dict = {"project": project, "head_cwd": head_cwd, "dashboard": dashboard, "env": env}
    # Ray runs the entrypoint in the job's working_dir; `local://` is the folder itself (README's
    # one-machine form): the driver reads relative paths there (a missing one fails before any actor)
    out["local"] = submit("--working-dir", f"local://{project}", "--", *train, "--set", "data.valid=data/none.json")
    # `make submit`: an uploaded working_dir (Ray's unpacked copy, without the ignored data/ and
    # checkpoints/), the job named after the config
    out["make"] = until_an_agent(["make", "-s", "-f", str(REPO / "Makefile"), "submit", f"VENV={BIN.parent}",
                                  "CONFIG=configs/job.yaml", f"RAY_JOB_ADDRESS={dashboard}"])
    # the run: started in the checkout, its actors in the head's folder; it trains on the checkout's files
    out["started"] = time.time()
    out["run"] = submit("--", "bash", "-c", f"cd {shlex.quote(str(project))} && {shlex.join(train)}")
    out["ended"] = time.time()
    return out


def on_the_head(submitted: dict, code: str) -> typing.Any:
    """What ``code`` (Python, which prints JSON) says, run against the head as a client."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=submitted["env"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ray_job_submit_runs_training_from_relative_paths(submitted) -> None:
    project, head_cwd = submitted["project"], submitted["head_cwd"]
    proc = submitted["local"]
    assert proc.returncode != 0
    assert f"data.valid: 'data/none.json' does not exist (tried {project / 'data' / 'none.json'})" in proc.stdout, proc.stdout[-3000:]
    # an uploaded working_dir (`--working-dir .`, `make submit`): Ray's unpacked copy, without the
    # ignored data/ and checkpoints/; the error says where it looked and how to submit instead
    proc = submitted["make"]
    assert proc.returncode != 0
    assert "model_path: 'checkpoints/tiny' does not exist (tried " in proc.stdout, proc.stdout[-3000:]
    assert "_ray_pkg_" in proc.stdout and 'submit with --working-dir "local://$PWD"' in proc.stdout

    proc = submitted["run"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert "succeeded" in proc.stdout.lower()
    out = project / "runs" / "job"
    assert f"run folder:   {out}" in proc.stdout
    assert not (head_cwd / "runs").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "checkpoints" / "step-000002" / "run_state.json").is_file()
    recorded = load_config(out / "config.yaml")  # the resolved config, as every actor got it
    assert recorded.model_path == project / "checkpoints" / "tiny"
    assert recorded.data.train == project / "data" / "synth" / "train" / "omni_rl_format_train.json"
    assert recorded.output_dir == out


def test_make_submit_names_the_job(submitted) -> None:
    jobs = on_the_head(submitted, textwrap.dedent(f"""
        import json
        from ray.job_submission import JobSubmissionClient
        jobs = JobSubmissionClient({submitted["dashboard"]!r}).list_jobs()
        print(json.dumps([{{"id": j.submission_id, "metadata": j.metadata, "entrypoint": j.entrypoint}} for j in jobs]))
    """))
    named = [j for j in jobs if j["metadata"].get("job_name") == "job"]  # the Jobs page's Name column
    assert len(named) == 1, jobs
    assert re.fullmatch(r"job-\d{8}-\d{6}", named[0]["id"]), named
    assert named[0]["metadata"]["config"] == "configs/job.yaml"
    assert named[0]["entrypoint"] == "echoink train --config configs/job.yaml"
    # the jobs submitted without a name: the Name column shows "-"
    others = [j for j in jobs if j is not named[0]]
    assert len(others) == 2 and not any("job_name" in j["metadata"] for j in others)


def test_the_dashboard_lists_the_runs_actors_by_name_with_role_node_device_and_version(submitted) -> None:
    placement = json.loads((submitted["project"] / "runs" / "job" / "placement.json").read_text())
    engines = [e["actor"] for e in placement["engines"]]
    ranks = [r["actor"] for r in placement["learner_ranks"]]
    label = re.fullmatch(r"echoink-(job-[0-9a-f]{4})-engine-0", engines[0])
    assert label, engines
    assert ranks == [f"echoink-{label.group(1)}-learner-{i}" for i in range(2)]
    actors = on_the_head(submitted, textwrap.dedent(f"""
        import json
        from ray.util.state import list_actors
        found = list_actors(address={submitted["dashboard"]!r}, detail=True, limit=10000, raise_on_missing_output=False)
        print(json.dumps({{a.name: [a.class_name, a.state, a.repr_name] for a in found if a.name}}))
    """))
    host = socket.gethostname()
    # Ray takes the repr once the actor has started: the weights it was built with, no step yet
    assert actors[engines[0]] == ["RolloutEngine", "DEAD", f"engine 0 @ {host} [cpu] weights v0"]
    for rank, name in enumerate(ranks):
        assert actors[name] == ["LearnerWorker", "DEAD", f"learner rank {rank}/2 @ {host} [cpu] step 0"]
    assert not [n for n in actors if n.startswith("echoink-") and n not in (*engines, *ranks)]  # one run trained


def test_prometheus_scrapes_the_run_and_the_grafana_dashboard_charts_it(submitted, prometheus) -> None:
    from watch.metrics_log import prometheus_name
    from watch.monitoring import DASHBOARD_FILE, PANELS, dashboard_metrics, metric_names

    if isinstance(prometheus, Exception):
        pytest.fail(f"no Prometheus: {prometheus}")
    assert submitted["run"].returncode == 0, submitted["run"].stdout[-3000:]

    def query(path: str, **params: typing.Any) -> typing.Any:
        with urllib.request.urlopen(f"{prometheus}{path}?{urllib.parse.urlencode(params)}", timeout=30) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]

    rows = [json.loads(line) for line in (submitted["project"] / "runs" / "job" / "metrics.jsonl").read_text().splitlines()]
    # the latest value Prometheus holds is one the run logged (a range selector reads past the
    # staleness marker Prometheus sets once the finished driver's series left the endpoint)
    name = prometheus_name("timing/step_s")
    assert name == "ray_echoink_timing_step_s"
    found = query("/api/v1/query", query=f'last_over_time({name}{{run="job"}}[15m])')["result"]
    assert len(found) == 1 and found[0]["metric"]["run"] == "job", found
    assert float(found[0]["value"][1]) in [pytest.approx(r["timing/step_s"], rel=1e-9) for r in rows]
    # every metric the dashboard names is one this run exported, but those of GPU runs and evaluations
    charted = {n for p in PANELS for s in p.series if not s.only for n in metric_names(s.promql())}
    assert charted < dashboard_metrics(json.loads(DASHBOARD_FILE.read_text()))
    exported = set(query("/api/v1/label/__name__/values"))
    assert not charted - exported, sorted(charted - exported)
    # and each chart of the dashboard, as Grafana asks for it, has this run's points
    empty = []
    for panel in PANELS:
        for series in (s for s in panel.series if not s.only):
            data = query("/api/v1/query_range", query=series.promql().replace("$run", "job"),
                         start=submitted["started"], end=submitted["ended"] + 10, step=2)["result"]
            if not data:
                empty.append(f"{panel.title}: {series.legend or series.metric}")
    assert not empty, empty
