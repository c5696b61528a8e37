"""How an EchoInk actor names itself on Ray's dashboard: the repr of a rollout engine or a
learner rank.

Ray calls an actor's ``__repr__`` once, when its ``__init__`` has returned, and keeps the text: the
Actors page shows it beside the actor's name (``repr_name`` in ``ray.util.state.list_actors``) and
the actor's log lines carry it as their prefix. So the weight version or step it shows is the one
the actor started with; the run's metrics (``faults/engine_restarts``, the step) say where it is
now. Called later (a traceback, a log line of ours) the repr is current. It lives here, beside the
other pieces both sides share, because rollout and learner never import each other.
"""

from __future__ import annotations

import socket


def actor_repr(who: str, state: str) -> str:
    """``engine 0 @ node-3 [gpu 0,1] weights v0``: ``who`` (role and index), the node's hostname,
    the GPUs Ray gave this process ("cpu" without any) and ``state``."""
    import ray

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    devices = "gpu " + ",".join(str(g) for g in gpus) if gpus else "cpu"
    return f"{who} @ {socket.gethostname()} [{devices}] {state}"
