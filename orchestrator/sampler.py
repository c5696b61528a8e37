"""A resumable, seeded question sampler over epochs: its position is part of every checkpoint."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0
    drawn: int = 0


class QuestionSampler:
    """Each epoch is a fresh permutation of the dataset (seeded by run seed and epoch); batches run
    across epoch boundaries, so every question is seen once per epoch."""

    def __init__(self, size: int, seed: int, shuffle: bool = True, state: SamplerState | None = None) -> None:
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.state = state or SamplerState()

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            order = self._order(self.state.epoch)
            take = min(count - len(out), self.size - self.state.position)
            out.extend(int(i) for i in order[self.state.position : self.state.position + take])
            self.state.position += take
            if self.state.position == self.size:
                self.state.epoch += 1
                self.state.position = 0
        self.state.drawn += count
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "position": self.state.position, "drawn": self.state.drawn}

    def load_state_dict(self, data: dict[str, int]) -> None:
        self.state = SamplerState(int(data["epoch"]), int(data["position"]), int(data.get("drawn", 0)))


def request_salts(step: int, ids: Sequence[str], seen: Counter[str]) -> list[int | str]:
    """The salt of each question's request seeds (`rollout.engine.request_seed`): the step, and for
    a question drawn again in the same step (a batch across an epoch boundary, a dynamic-sampling
    draw) the step and the time it is drawn, so its G completions are new draws, not copies of the
    first ones. ``seen`` counts the step's draws so far and is updated."""
    salts: list[int | str] = []
    for question in ids:
        salts.append(step if seen[question] == 0 else f"{step}.{seen[question]}")
        seen[question] += 1
    return salts
