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

from orchestrator.config import RunConfig, check_colocation


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

    @property
    def engines_sleep(self) -> bool:
        """Colocated on GPUs: engines free their memory while the learner trains (CPUs: no)."""
        return self.mode == "colocated" and self.use_gpus

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


def run_label(output_dir: str | os.PathLike[str]) -> str:
    """The run's part of its actors' Ray names: the run folder's name, in characters that read
    well on the dashboard, and a short random id, so that two runs of one folder name, or a run
    restarted after a fault while its dead actors are still listed, never ask for a name that Ray
    still holds (names are unique per Ray namespace, and one test session is one namespace)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(os.path.normpath(os.fspath(output_dir)))).strip("-.")
    return f"{name[:32] or 'run'}-{secrets.token_hex(2)}"


def actor_name(label: str, role: str, index: int) -> str:
    """``echoink-<run>-<id>-engine-0``, ``echoink-<run>-<id>-learner-1``: what the Actors page of
    Ray's dashboard lists (a restarted engine adds ``-restart-<n>``, see engine_start_options)."""
    return f"{_prefixed(label)}-{role}-{index}"


def _prefixed(label: str) -> str:
    # runs/echoink-r1-7b gives echoink-r1-7b-…, not echoink-echoink-r1-7b-…
    return label if label.startswith("echoink") else f"echoink-{label}"


def decide_gpus(setting: str) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if setting == "yes":
        if gpus < 1:
            raise RuntimeError("ray.use_gpus is 'yes' but the Ray cluster has no GPUs")
        return True
    if setting == "no":
        return False
    return gpus >= 1


def split_gpus(engines: int, tp: int, ranks: int) -> int:
    return engines * tp + ranks


def decide_mode(setting: str, use_gpus: bool, engines: int, tp: int, ranks: int) -> tuple[str, str]:
    """The placement mode and why: ``auto`` splits where the cluster's GPUs hold the split layout."""
    if setting != "auto":
        return setting, f"placement.mode is {setting}"
    if not use_gpus:
        return "split", "no GPUs: the roles share the CPUs either way"
    need, have = split_gpus(engines, tp, ranks), int(ray.cluster_resources().get("GPU", 0))
    if need <= have:
        return "split", f"the split layout needs {need} GPUs and the cluster has {have}"
    return "colocated", f"the split layout needs {need} GPUs but the cluster has {have}: engines share the learner's GPUs"


def check_capacity(use_gpus: bool, engines: int, tp: int, ranks: int, mode: str = "split") -> None:
    """Fail early and clearly when the cluster cannot hold the layout (instead of waiting forever)."""
    if not use_gpus:
        return
    need = ranks if mode == "colocated" else split_gpus(engines, tp, ranks)
    have = int(ray.cluster_resources().get("GPU", 0))
    if need > have:
        what = "colocated pairs" if mode == "colocated" else f"{engines} engine(s) × {tp} + {ranks} learner rank(s)"
        raise RuntimeError(f"the layout needs {need} GPUs ({what}) but the Ray cluster has {have}")


def plan_run(config: RunConfig, use_gpus: bool, *, learner: bool = True) -> Placement:
    """The placement of a run's engines and (unless ``learner`` is False: evaluation) learner ranks."""
    r, lc = config.rollout, config.learner
    ranks = lc.num_ranks if learner else 0
    mode, why = decide_mode(config.placement.mode if learner else "split", use_gpus, r.num_engines,
                            r.tensor_parallel_size, ranks)
    if mode == "colocated":
        check_colocation(config)
    placement = plan(
        mode=mode, use_gpus=use_gpus, engines=r.num_engines, tensor_parallel_size=r.tensor_parallel_size, ranks=ranks,
        cpus_per_engine=r.cpus_per_engine, cpus_per_rank=lc.cpus_per_rank, engine_resources=r.resources,
        learner_resources=lc.resources, label=run_label(config.output_dir),
        engine_role="engine" if learner else "eval-engine",
    )
    placement.why = why
    return placement


def plan(
    *,
    use_gpus: bool,
    engines: int,
    tensor_parallel_size: int,
    ranks: int,
    cpus_per_engine: float,
    cpus_per_rank: float,
    engine_resources: dict[str, float] | None = None,
    learner_resources: dict[str, float] | None = None,
    timeout_s: float = 600.0,
    mode: str = "split",
    label: str = "",
    engine_role: str = "engine",
) -> Placement:
    """Placement groups for the engines and learner ranks, and each actor's options; with a
    ``label`` (run_label) every actor and group is named after the run."""
    check_capacity(use_gpus, engines, tensor_parallel_size, ranks, mode)
    env = {"env_vars": actor_env()}
    engine_bundle: dict[str, float] = {"CPU": cpus_per_engine, **(engine_resources or {})}
    rank_bundle: dict[str, float] = {"CPU": cpus_per_rank, **(learner_resources or {})}
    if use_gpus:
        engine_bundle["GPU"] = float(tensor_parallel_size)
        rank_bundle["GPU"] = 1.0
    if mode == "colocated":
        placement = _colocated(use_gpus, engines, ranks, engine_bundle, rank_bundle, env, timeout_s, label)
        return _named(placement, label, engine_role)
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
        use_gpus=use_gpus,
        engine_options=[_options(groups["rollout"], i, engine_bundle, env) for i in range(engines)],
        learner_options=[_options(groups["learner"], i, rank_bundle, env) for i in range(ranks)],
        groups=list(groups.values()),
    )
    return _named(placement, label, engine_role)


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
