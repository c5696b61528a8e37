"""Connecting to Ray: the cluster a job runs in, or a local one started for this run."""

from __future__ import annotations

import os

import ray


def connect(address: str | None, num_cpus: float | None, needed_cpus: float) -> str:
    """Join ``address`` (or ``RAY_ADDRESS``, or a cluster started on this machine with `ray start`);
    else start a local Ray with enough logical CPUs for the run's actors."""
    if ray.is_initialized():
        return "existing"
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}}
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, runtime_env=env, log_to_driver=True)
        return f"cluster at {target}"
    try:
        ray.init(address="auto", runtime_env=env, log_to_driver=True)
        return "local cluster found on this machine"
    except ConnectionError:
        pass
    cpus = num_cpus if num_cpus is not None else max(float(os.cpu_count() or 1), needed_cpus)
    ray.init(num_cpus=cpus, runtime_env=env, include_dashboard=None, log_to_driver=True)
    return f"new local Ray ({cpus:g} logical CPUs)"
