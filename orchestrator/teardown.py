"""Ending a run's actors, and waiting until they are gone.

`ray.kill` only asks. Ray marks the actor DEAD in its actor table at once, and its process exits
a moment later: on a CPU tens of milliseconds, on a GPU as long as the driver takes to release
the device (seen on one H200: right after ``train()`` returned, the engine and learner processes
still held 129 GiB, and the next job on that GPU ran out of memory). So the end of a run waits
until every actor it killed is DEAD in Ray's actor table and its process, with the processes it
had started (vLLM's tensor-parallel workers hold GPU memory of their own), no longer runs on its
node; a process that has exited but is not yet reaped (a zombie) holds no memory and counts as
gone.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray

SHUTDOWN_TIMEOUT_S = 120.0  # a GPU process may take seconds to give its memory back; not minutes
POLL_S = 0.1
NODE_CHECK_TIMEOUT_S = 30.0  # a task that looks at another node's processes


@dataclass
class ActorProcesses:
    """One actor as Ray lists it: its name (or class and id), node and process ids."""

    actor_id: str
    name: str
    node_id: str
    pids: list[int] = field(default_factory=list)  # the actor's process first, then its children

    def words(self, alive: Sequence[int] = ()) -> str:
        pids = ", ".join(map(str, alive or self.pids)) or "none"
        return f"{self.name} (process {pids} on node {self.node_id[:12]})"


def process_tree(pids: Sequence[int]) -> dict[int, list[int]]:
    """Each running process of ``pids`` with its children, on this node."""
    import psutil

    out: dict[int, list[int]] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out[pid] = [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return out


def running(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` that still run on this node (a zombie has exited: it holds no memory)."""
    import psutil

    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


_remote: dict[Any, Any] = {}  # each function made a Ray task once


def _on_node(node_id: str, fn: Any, pids: Sequence[int], node_gone: Any) -> Any:
    """``fn(pids)`` on the node ``node_id``: here when it is the driver's node, else in a task
    pinned there; ``node_gone`` when that node has left the cluster (its processes with it), None
    when the node is there but could not be asked (the caller keeps waiting)."""
    if not node_id or node_id == ray.get_runtime_context().get_node_id():
        return fn(list(pids))
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if fn not in _remote:
        _remote[fn] = ray.remote(num_cpus=0, max_retries=0)(fn)
    task = _remote[fn].options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return ray.get(task.remote(list(pids)), timeout=NODE_CHECK_TIMEOUT_S)
    except (ray.exceptions.RayError, TimeoutError):
        if node_id not in {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            return node_gone
        return None


def _table(actor_id: str) -> dict[str, Any]:
    """The actor's row in Ray's actor table (the control store's, no dashboard needed)."""
    from ray._private.state import actors

    return actors(actor_id=actor_id) or {}


def describe(actor: Any) -> ActorProcesses:
    """Who ``actor`` is and which processes are its, read before it is killed (its children can
    only be found while it runs)."""
    actor_id = actor._actor_id.hex()
    row = _table(actor_id)
    name = row.get("Name") or f"{row.get('ActorClassName') or 'actor'} {actor_id[:12]}"
    node_id = (row.get("Address") or {}).get("NodeID", "")
    pid = int(row.get("Pid") or 0)
    described = ActorProcesses(actor_id=actor_id, name=name, node_id=node_id)
    if pid:  # also when DEAD: Ray lists an actor DEAD before its process has exited
        tree = _on_node(node_id, process_tree, [pid], node_gone={})
        if tree is None:  # its node did not answer: wait for the actor's own process at least
            described.pids = [pid]
        elif pid in tree:
            described.pids = [pid, *tree[pid]]
    return described


def kill_and_wait(actors: Sequence[Any], timeout_s: float = SHUTDOWN_TIMEOUT_S) -> list[str]:
    """Kill ``actors`` and wait until each is DEAD in Ray's actor table and none of its processes
    runs any more. Returns, for those that were not gone within ``timeout_s``, words naming the
    actor (its Ray name), its processes still running and its node; empty when all are gone."""
    if not ray.is_initialized():
        return []
    described = []
    for actor in actors:
        try:
            described.append(describe(actor))
        except Exception:  # noqa: BLE001 - a handle Ray no longer knows: nothing to wait for
            described.append(ActorProcesses(actor_id=actor._actor_id.hex(), name="?", node_id=""))
    for actor in actors:
        with contextlib.suppress(Exception):  # dead already
            ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    pending = described
    alive: dict[str, list[int]] = {}
    while True:
        still = []
        for entry in pending:
            try:
                found = _on_node(entry.node_id, running, entry.pids, node_gone=[]) if entry.pids else []
                alive[entry.actor_id] = entry.pids if found is None else found
                if alive[entry.actor_id] or _table(entry.actor_id).get("State", "DEAD") != "DEAD":
                    still.append(entry)
            except Exception:  # noqa: BLE001 - Ray's control store did not answer: ask again
                still.append(entry)
        pending = still
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return [entry.words(alive.get(entry.actor_id, ())) for entry in pending]


def end_actors(actors: Sequence[Any], what: str, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> list[str]:
    """`kill_and_wait`, with a warning that names the actors of ``what`` still running."""
    survivors = kill_and_wait(actors, timeout_s)
    if survivors:
        warnings.warn(
            f"{what}: {len(survivors)} actor(s) still running {timeout_s:.0f} s after they were killed, with the "
            f"memory they hold: {'; '.join(survivors)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return survivors
