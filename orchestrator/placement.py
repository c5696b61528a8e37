"""Where actors run: Ray placement groups for the rollout engines and the learner ranks.

GPU clusters: each engine gets a bundle of its tensor-parallel GPUs on one node, each learner rank
one GPU; the two roles never share a GPU. CPU-only clusters run the same code with CPU bundles.
Optional custom resources pin a role to a kind of node (``rollout.resources``/``learner.resources``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass
class Placement:
    use_gpus: bool
    engine_options: list[dict[str, Any]]
    learner_options: list[dict[str, Any]]
    groups: list[PlacementGroup]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups:
            with contextlib.suppress(Exception):  # already gone with the cluster
                remove_placement_group(group)


def actor_env() -> dict[str, str]:
    """Environment every actor gets (vLLM in-process, quiet tokenizers, the extension cache)."""
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


def decide_gpus(setting: str) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if setting == "yes":
        if gpus < 1:
            raise RuntimeError("ray.use_gpus is 'yes' but the Ray cluster has no GPUs")
        return True
    if setting == "no":
        return False
    return gpus >= 1


def check_capacity(use_gpus: bool, engines: int, tp: int, ranks: int) -> None:
    """Fail early and clearly when the cluster cannot hold the layout (instead of waiting forever)."""
    if not use_gpus:
        return
    need = engines * tp + ranks
    have = int(ray.cluster_resources().get("GPU", 0))
    if need > have:
        raise RuntimeError(
            f"the layout needs {need} GPUs ({engines} engine(s) × {tp} + {ranks} learner rank(s)) "
            f"but the Ray cluster has {have}"
        )


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
) -> Placement:
    check_capacity(use_gpus, engines, tensor_parallel_size, ranks)
    env = {"env_vars": actor_env()}
    engine_bundle: dict[str, float] = {"CPU": cpus_per_engine, **(engine_resources or {})}
    rank_bundle: dict[str, float] = {"CPU": cpus_per_rank, **(learner_resources or {})}
    if use_gpus:
        engine_bundle["GPU"] = float(tensor_parallel_size)
        rank_bundle["GPU"] = 1.0
    # either role may be absent: evaluation runs engines only, a warm start learner ranks only
    wanted = {"rollout": (engine_bundle, engines), "learner": (rank_bundle, ranks)}
    groups = {
        name: placement_group([dict(bundle) for _ in range(count)], strategy="PACK", name=f"echoink-{name}")
        for name, (bundle, count) in wanted.items()
        if count
    }
    for name, group in groups.items():
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            raise TimeoutError(
                f"the {name} placement group could not be placed within {timeout_s:.0f} s: "
                f"cluster resources {ray.cluster_resources()}, asked for {group.bundle_specs}"
            )

    def options(group: PlacementGroup, index: int, bundle: dict[str, float]) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "num_cpus": bundle["CPU"],
            "num_gpus": bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index
            ),
            "runtime_env": env,
        }
        custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
        if custom:
            opts["resources"] = custom
        return opts

    return Placement(
        use_gpus=use_gpus,
        engine_options=[options(groups["rollout"], i, engine_bundle) for i in range(engines)],
        learner_options=[options(groups["learner"], i, rank_bundle) for i in range(ranks)],
        groups=list(groups.values()),
    )
