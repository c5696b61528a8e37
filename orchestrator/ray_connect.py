"""Connecting to Ray: the cluster a job runs in, or a local one started for this run."""

from __future__ import annotations

import os

import ray

from orchestrator.placement import actor_env


def connect(address: str | None, num_cpus: float | None, needed_cpus: float) -> str:
    """Join ``address`` (``ray.address``; "auto" finds a cluster started here with `ray start`) or
    ``RAY_ADDRESS`` (which `ray job submit` sets); else start a local Ray with enough logical CPUs
    for the run's actors. Without either, no running cluster is probed: a cluster another process
    is tearing down (or a stale one) must never capture a run."""
    if ray.is_initialized():
        return "existing"
    env = {"env_vars": actor_env()}  # every worker of the job, also actors started without a placement
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, runtime_env=env, log_to_driver=True)
        return f"cluster at {target}"
    cpus = num_cpus if num_cpus is not None else max(float(os.cpu_count() or 1), needed_cpus)
    ray.init(num_cpus=cpus, runtime_env=env, include_dashboard=None, log_to_driver=True)
    return f"new local Ray ({cpus:g} logical CPUs)"
