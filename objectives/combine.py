"""Combining objectives: one weighted score for single-objective search, a tuple for Pareto search.

:class:`WeightedObjective` (maximize) is ``sum_i w_i * s_i * v_i`` where ``v_i`` is objective i's
value and ``s_i`` is +1 for a maximized objective and -1 for a minimized one, so a positive weight
always means "more of what that objective wants". The weights are not normalised: objectives on
different scales (CLIP ~30, FID ~100) need weights that say the trade-off. :func:`values` gives the
plain tuple, with each objective's direction, for multi-objective samplers such as NSGA-II.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from objectives.base import Direction, Objective


def sign(direction: Direction) -> float:
    """+1 for ``"maximize"``, -1 for ``"minimize"``."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    return 1.0 if direction == "maximize" else -1.0


class WeightedObjective:
    """Weighted sum of several objectives, maximized (see the module docstring)."""

    direction: Direction = "maximize"

    def __init__(self, objectives: Sequence[Objective], weights: Sequence[float], *, name: str = "weighted") -> None:
        if not objectives or len(objectives) != len(weights):
            raise ValueError(f"need one weight per objective, got {len(objectives)} objectives and {len(weights)} weights")
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objective names must be unique, got {names}")
        for o in objectives:
            sign(o.direction)
        self.objectives = list(objectives)
        self.weights = [float(w) for w in weights]
        self.name = name
        self.last: dict[str, float] = {}

    def reset(self) -> None:
        for o in self.objectives:
            o.reset()

    def update(self, images: Tensor, *, prompts: Sequence[str]) -> None:
        for o in self.objectives:
            o.update(images, prompts=prompts)

    def compute(self) -> float:
        self.last = {o.name: o.compute() for o in self.objectives}
        return sum(w * sign(o.direction) * self.last[o.name] for o, w in zip(self.objectives, self.weights, strict=True))


def values(objectives: Sequence[Objective]) -> tuple[float, ...]:
    """Each objective's value, in order (directions: ``[o.direction for o in objectives]``)."""
    return tuple(o.compute() for o in objectives)
