"""Where a learner step's time goes: a diagnostic clock for one step (issue 27's breakdown).

The worker marks the step's top-level phases with ``lap`` (inputs, reference forward, policy
forward, loss, backward, optimizer); forward hooks on the thinker's parts (the towers, the language
model, the head) take their share out of the phase that ran them. Every boundary waits for the
device (a sync), so a clocked step is slower than a timed one and is run apart from the timed steps
(``LearnerWorker.clocked_step``, ``benchmarks/bench_learner.py --breakdown``). The backward is one
phase: with gradient checkpointing it holds each layer's recomputed forward too.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class NullClock:
    """The clock of an ordinary step: marks cost nothing."""

    def lap(self, name: str) -> None:
        pass

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        yield


class PhaseClock(NullClock):
    """Exclusive seconds per phase of one step, device-synced at each boundary."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []  # the watched modules running now, outermost first
        self.prefix = ""
        self.handles: list[Any] = []
        self.last = self._now()
        self.pending = 0.0  # seconds outside watched modules since the last lap: the next lap's

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _close(self) -> float:
        """Seconds since the last boundary; the boundary moves to now."""
        now = self._now()
        spent, self.last = now - self.last, now
        return spent

    def lap(self, name: str) -> None:
        """The time since the previous lap, less what watched modules took, is ``name``'s."""
        self.seconds[self.prefix + name] += self.pending + self._close()
        self.pending = 0.0

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Laps and watched modules inside are named ``name: …`` (the reference's forward)."""
        before = self.prefix
        self.prefix = f"{name}: "
        try:
            yield
        finally:
            self.prefix = before

    def watch(self, module: torch.nn.Module, label: str | Callable[[list[str]], str]) -> None:
        """Time ``module``'s forward calls under ``label`` (a string, or a function of the labels
        running now that returns one)."""

        def enter(*_: Any) -> None:
            spent = self._close()
            if self.stack:
                self.seconds[self.stack[-1]] += spent
            else:  # the enclosing lap's, named when it closes
                self.pending += spent
            name = label(self.stack) if callable(label) else label
            self.stack.append(self.prefix + name)

        def leave(*_: Any) -> None:
            spent = self._close()
            self.seconds[self.stack.pop()] += spent

        self.handles.append(module.register_forward_pre_hook(enter))
        self.handles.append(module.register_forward_hook(leave))

    def watch_thinker(self, thinker: torch.nn.Module) -> None:
        """The towers, the language model (inside the thinker's own forward, or called on its own
        for the completions of shared prompts), the output layer and the thinker's glue."""
        self.watch(thinker, "thinker glue (embeddings, positions, merging the media)")
        for attribute, label in (("visual", "vision tower"), ("audio_tower", "audio tower"), ("lm_head", "head")):
            part = getattr(thinker, attribute, None)
            if part is not None:
                self.watch(part, label)

        def language_model(running: list[str]) -> str:
            if running:
                return "language model, prompt or whole-sequence pass"
            return "language model, completions on the prompts' keys"

        self.watch(thinker.model, language_model)

    def close(self) -> dict[str, float]:
        """Remove the hooks; the seconds per phase, largest first."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return dict(sorted(((k, v) for k, v in self.seconds.items() if v > 0), key=lambda kv: -kv[1]))
