"""Where actors run: Ray placement groups for the rollout engines and the learner ranks.

Split (``placement.mode: split``): each engine gets a bundle of its tensor-parallel GPUs on one
node, each learner rank one GPU of its own. Colocated: engine i and learner rank i share one
bundle (one GPU, each actor asks for half of it), so one GPU runs the whole loop. CPU-only
clusters run the same code with CPU bundles. Optional custom resources pin a role to a kind of
node (``rollout.resources``/``learner.resources``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass(frozen=True)
class Layout:
    """Where a run's actors go, decided before anything starts (`orchestrator.plan`): the mode,
    the counts and each role's bundle. `place` turns it into placement groups."""

    use_gpus: bool
    engines: int
    tensor_parallel_size: int
    ranks: int
    cpus_per_engine: float
    cpus_per_rank: float
    engine_resources: dict[str, float] = field(default_factory=dict)
    learner_resources: dict[str, float] = field(default_factory=dict)
    mode: str = "split"  # or "colocated": engine i and learner rank i share bundle i
    why: str = ""  # why this mode (placement.mode: auto decides by the cluster's GPUs)
    label: str = ""  # the run's name (run_name); its actors' names add an id (run_label); "": unnamed
    engine_role: str = "engine"  # "eval-engine" for `echoink eval`

    @property
    def gpus_needed(self) -> int:
        if not self.use_gpus:
            return 0
        return self.ranks if self.mode == "colocated" else split_gpus(self.engines, self.tensor_parallel_size, self.ranks)

    @property
    def engines_sleep(self) -> bool:
        """Colocated on GPUs: engines free their memory while the learner trains (CPUs: no)."""
        return self.mode == "colocated" and self.use_gpus


@dataclass
class Placement:
    use_gpus: bool
    engine_options: list[dict[str, Any]]
    learner_options: list[dict[str, Any]]
    groups: list[PlacementGroup]
    mode: str = "split"  # or "colocated": engine i and learner rank i share bundle i
    why: str = ""  # why this mode (placement.mode: auto decides by the cluster's GPUs)
    label: str = ""  # the run's part of its actors' names (run_label); "": unnamed actors
    _engine_starts: dict[int, int] = field(default_factory=dict, repr=False)

    def engine_start_options(self, index: int) -> dict[str, Any]:
        """The options that start engine ``index``: its first start gets the planned name, each
        restart ``…-restart-<n>``. A restarted engine cannot take the dead one's name: Ray frees
        it only once its control store has processed the death, which may come after the trainer
        saw the engine die, and a taken name fails the start (ActorAlreadyExistsError)."""
        options = dict(self.engine_options[index])
        starts = self._engine_starts.get(index, 0)
        self._engine_starts[index] = starts + 1
        if starts and "name" in options:
            options["name"] = f"{options['name']}-restart-{starts}"
        return options

    def record(self, engines: Sequence[dict[str, Any]], ranks: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """placement.json: the mode, and where each engine and learner rank runs; colocated,
        which GPU (or CPU bundle) each pair shares."""
        named = [{**e, "actor": self.engine_options[e["index"]].get("name", "")} for e in engines]
        named_ranks = [{**r, "actor": self.learner_options[r["rank"]].get("name", "")} for r in ranks]
        out: dict[str, Any] = {"mode": self.mode, "why": self.why, "engines": named, "learner_ranks": named_ranks}
        if self.mode == "colocated":
            out["shared"] = [{"engine": e["index"], "learner_rank": r["rank"], "gpus": e["gpus"], "node_id": e["node_id"]}
                             for e, r in zip(engines, ranks, strict=False)]  # ranks past the engines: alone
        return out

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            with contextlib.suppress(Exception):  # already gone with the cluster
                remove_placement_group(group)


def actor_env() -> dict[str, str]:
    """The one place that sets environment variables for EchoInk's processes: every actor gets
    these (vLLM in-process, quiet tokenizers, no hub, the extension cache), and so do the test
    and benchmark drivers; variables a user set are passed through."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",  # checkpoints are local folders; never reach for a hub
        "VLLM_LOGGING_LEVEL": "ERROR",  # the CPU backend repeats a thread-binding warning per call
    }
    for key in (*env, "TORCH_EXTENSIONS_DIR", "VLLM_USE_FLASHINFER_SAMPLER", "PYTHONPATH", "CUDA_HOME", "ECHOINK_FAILPOINTS"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def run_name(output_dir: str | os.PathLike[str]) -> str:
    """The run folder's name in characters that read well on the dashboard (a layout's label)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(os.path.normpath(os.fspath(output_dir)))).strip("-.")
    return name[:32] or "run"


def run_label(output_dir: str | os.PathLike[str]) -> str:
    """The run's part of its actors' Ray names: `run_name` and a short random id, drawn when the
    actors are placed, so that two runs of one folder name, or a run restarted after a fault while
    its dead actors are still listed, never ask for a name that Ray still holds (names are unique
    per Ray namespace, and one test session is one namespace)."""
    return f"{run_name(output_dir)}-{secrets.token_hex(2)}"


def actor_name(label: str, role: str, index: int) -> str:
    """``echoink-<run>-<id>-engine-0``, ``echoink-<run>-<id>-learner-1``: what the Actors page of
    Ray's dashboard lists (a restarted engine adds ``-restart-<n>``, see engine_start_options)."""
    return f"{_prefixed(label)}-{role}-{index}"


def _prefixed(label: str) -> str:
    # runs/echoink-r1-7b gives echoink-r1-7b-…, not echoink-echoink-r1-7b-…
    return label if label.startswith("echoink") else f"echoink-{label}"


def cluster_gpus() -> int:
    """The GPUs of the Ray cluster this driver is connected to."""
    return int(ray.cluster_resources().get("GPU", 0))


def node_memory_gib() -> tuple[float | None, float]:
    """This node's GPU memory (each GPU's, the smallest; None without ``nvidia-smi`` or GPUs) and
    host memory, in GiB. Read through nvidia-smi, not torch: a CUDA context in the driver would hold
    memory on GPU 0 for the whole run, beside a colocated engine and learner."""
    import shutil
    import subprocess

    import psutil

    host = psutil.virtual_memory().total / 2**30
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, host
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        sizes = [float(line) / 1024 for line in out.split() if line.strip()]  # MiB
    except (subprocess.SubprocessError, OSError, ValueError):
        return None, host
    return (min(sizes) if sizes else None), host


def split_gpus(engines: int, tp: int, ranks: int) -> int:
    return engines * tp + ranks


def check_capacity(layout: Layout, have: int) -> None:
    """Fail early and clearly when the cluster cannot hold the layout (instead of waiting forever)."""
    need = layout.gpus_needed
    if need > have:
        what = ("colocated pairs" if layout.mode == "colocated"
                else f"{layout.engines} engine(s) × {layout.tensor_parallel_size} + {layout.ranks} learner rank(s)")
        raise RuntimeError(f"the layout needs {need} GPUs ({what}) but the Ray cluster has {have}")


def place(layout: Layout, timeout_s: float = 600.0) -> Placement:
    """Placement groups for the layout's engines and learner ranks, and each actor's options; with
    a ``label`` (run_label) every actor and group is named after the run. Whether the cluster holds
    the layout was checked when it was planned (`orchestrator.plan.layout_for`)."""
    env = {"env_vars": actor_env()}
    engine_bundle: dict[str, float] = {"CPU": layout.cpus_per_engine, **layout.engine_resources}
    rank_bundle: dict[str, float] = {"CPU": layout.cpus_per_rank, **layout.learner_resources}
    if layout.use_gpus:
        engine_bundle["GPU"] = float(layout.tensor_parallel_size)
        rank_bundle["GPU"] = 1.0
    engines, ranks = layout.engines, layout.ranks
    label = run_label(layout.label) if layout.label else ""
    if layout.mode == "colocated":
        placement = _colocated(layout.use_gpus, engines, ranks, engine_bundle, rank_bundle, env, timeout_s, label)
    else:
        # either role may be absent: evaluation runs engines only, a warm start learner ranks only
        wanted = {"rollout": (engine_bundle, engines), "learner": (rank_bundle, ranks)}
        groups = {
            name: placement_group([dict(bundle) for _ in range(count)], strategy="PACK", name=_group_name(label, name))
            for name, (bundle, count) in wanted.items()
            if count
        }
        for name, group in groups.items():
            _wait_placed(name, group, timeout_s)
        placement = Placement(
            use_gpus=layout.use_gpus,
            engine_options=[_options(groups["rollout"], i, engine_bundle, env) for i in range(engines)],
            learner_options=[_options(groups["learner"], i, rank_bundle, env) for i in range(ranks)],
            groups=list(groups.values()),
        )
    placement.why = layout.why
    return _named(placement, label, layout.engine_role)


def _group_name(label: str, role: str) -> str:
    return f"{_prefixed(label)}-{role}" if label else f"echoink-{role}"


def _named(placement: Placement, label: str, engine_role: str) -> Placement:
    """Give every actor its Ray name (none without a label: benchmarks, warm starts)."""
    if label:
        placement.label = label
        for i, opts in enumerate(placement.engine_options):
            opts["name"] = actor_name(label, engine_role, i)
        for i, opts in enumerate(placement.learner_options):
            opts["name"] = actor_name(label, "learner", i)
    return placement


def _colocated(
    use_gpus: bool,
    engines: int,
    ranks: int,
    engine_bundle: dict[str, float],
    rank_bundle: dict[str, float],
    env: dict[str, Any],
    timeout_s: float,
    label: str = "",
) -> Placement:
    """One bundle per learner rank; bundle i < engines also holds engine i: the CPUs and custom
    resources of both roles and one GPU, which the engine and the rank each take half of (Ray
    then shows both on that GPU). Ranks beyond the engines have their bundle alone."""
    shared = {k: engine_bundle.get(k, 0.0) + rank_bundle.get(k, 0.0) for k in {*engine_bundle, *rank_bundle}}
    alone = dict(rank_bundle)
    if use_gpus:
        shared["GPU"] = 1.0
        engine_bundle, rank_bundle = {**engine_bundle, "GPU": 0.5}, {**rank_bundle, "GPU": 0.5}
    bundles = [dict(shared) for _ in range(engines)] + [dict(alone) for _ in range(ranks - engines)]
    group = placement_group(bundles, strategy="PACK", name=_group_name(label, "colocated"))
    _wait_placed("colocated", group, timeout_s)
    return Placement(
        use_gpus=use_gpus,
        engine_options=[_options(group, i, engine_bundle, env) for i in range(engines)],
        learner_options=[_options(group, i, rank_bundle if i < engines else alone, env) for i in range(ranks)],
        groups=[group],
        mode="colocated",
    )


def _wait_placed(name: str, group: PlacementGroup, timeout_s: float) -> None:
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        raise TimeoutError(
            f"the {name} placement group could not be placed within {timeout_s:.0f} s: "
            f"cluster resources {ray.cluster_resources()}, asked for {group.bundle_specs}"
        )


def _options(group: PlacementGroup, index: int, bundle: dict[str, float], env: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "num_cpus": bundle["CPU"],
        "num_gpus": bundle.get("GPU", 0),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index),
        "runtime_env": env,
    }
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    if custom:
        opts["resources"] = custom
    return opts
