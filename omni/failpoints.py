"""Fault injection for tests of crash safety: ``ECHOINK_FAILPOINTS="name@N=action,…"``.

Actions: ``kill`` (SIGKILL this process, as an OOM killer or a preempted node would), ``enospc``
(raise "No space left on device"), or any other word, which the call site reads (``nan``: the
learner poisons its loss). ``@N`` fires on the N-th hit only, ``@N+`` from the N-th hit on (default
the first). Unset, a failpoint costs one environment lookup.
"""

from __future__ import annotations

import errno
import os
import signal

_hits: dict[str, int] = {}


def _plan() -> dict[str, tuple[int, bool, str]]:
    plan: dict[str, tuple[int, bool, str]] = {}
    for item in os.environ.get("ECHOINK_FAILPOINTS", "").split(","):
        if not item.strip():
            continue
        point, _, action = item.strip().partition("=")
        name, _, nth = point.partition("@")
        onwards = nth.endswith("+")
        plan[name] = (int(nth.rstrip("+") or 1), onwards, action or "kill")
    return plan


def failpoint(name: str) -> str | None:
    """Fire the named failpoint if it is armed; returns the action for the caller to act on."""
    if "ECHOINK_FAILPOINTS" not in os.environ:
        return None
    plan = _plan()
    if name not in plan:
        return None
    _hits[name] = _hits.get(name, 0) + 1
    nth, onwards, action = plan[name]
    if _hits[name] < nth or (_hits[name] > nth and not onwards):
        return None
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    return action
