"""Combining objectives: one score for single-objective search, a tuple for Pareto search.

Each objective ``i`` has a value ``v_i``, a direction (``s_i`` = +1 maximize, -1 minimize) and a
weight ``w_i > 0``. Scorers live on different scales (CLIP ~30, FID ~100, ImageReward ~0), so a
study normalises them against its calibration set (:mod:`objectives.calibration`) before mixing:

* normalised score ``n_i = (v_i - noise_i) / (parents_i - noise_i)``: 0 for noise images, 1 for
  the parents' own renders, above 1 for better than the parents; the ratio already points the
  right way for minimized objectives (FID of noise is above FID of the parents). Without
  normalisation ``n_i = s_i v_i``.
* ``sum``: ``sum_i w_i n_i`` (the raw weighted sum of earlier versions when not normalised);
* ``arithmetic``: ``sum_i w_i n_i / sum_i w_i``;
* ``geometric``: ``exp(sum_i w_i log max(n_i, eps) / sum_i w_i)`` (eps = 1e-6: a value at or
  below noise counts as eps, so one failing objective drags the score to ~0);
* ``quadratic``: ``sqrt(sum_i w_i max(n_i, 0)^2 / sum_i w_i)``.

The three means are those of sd-optim and bayesian-merger's ``score_weight`` averaging. Geometric
and quadratic need normalised scores (the study file refuses them otherwise).
:class:`WeightedObjective` wraps several objectives as one (``sum``, unnormalised); :func:`values`
gives the plain tuple for multi-objective samplers such as NSGA-II.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from objectives.base import Direction, Objective, ObjectiveError

MEANS = ("sum", "arithmetic", "geometric", "quadratic")
EPS = 1e-6


def sign(direction: Direction) -> float:
    """+1 for ``"maximize"``, -1 for ``"minimize"``."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    return 1.0 if direction == "maximize" else -1.0


def normalised(value: float, *, noise: float, parents: float, name: str = "objective") -> float:
    """``(value - noise) / (parents - noise)`` (see the module docstring)."""
    gap = parents - noise
    if not math.isfinite(gap) or gap == 0:
        raise ObjectiveError(f"{name}: cannot normalise: the parents' renders score {parents:.6g} and noise {noise:.6g}")
    return (value - noise) / gap


def combine_scores(
    values: Sequence[float], *, weights: Sequence[float], directions: Sequence[Direction], mean: str = "sum",
    anchors: Sequence[Mapping[str, float]] | None = None, names: Sequence[str] | None = None,
) -> float:
    """One score from several objective values (see the module docstring for each formula).
    ``anchors``: per objective ``{"noise": ..., "parents": ...}`` (normalise), or ``None`` (raw)."""
    if not (len(values) == len(weights) == len(directions)) or not values:
        raise ValueError(f"need one weight and direction per value, got {len(values)}, {len(weights)}, {len(directions)}")
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {', '.join(MEANS)}, got {mean!r}")
    names = list(names) if names is not None else [f"objective {i}" for i in range(len(values))]
    if anchors is None:
        if mean in ("geometric", "quadratic"):
            raise ValueError(f"a {mean} mean needs normalised scores (anchors)")
        scores = [sign(d) * v for d, v in zip(directions, values, strict=True)]
    else:
        scores = [normalised(v, noise=a["noise"], parents=a["parents"], name=n) for v, a, n in zip(values, anchors, names, strict=True)]
    w = [float(x) for x in weights]
    if mean == "sum":
        return sum(wi * si for wi, si in zip(w, scores, strict=True))
    total = sum(w)
    if total <= 0 or any(wi <= 0 for wi in w):
        raise ValueError(f"a {mean} mean needs positive weights, got {w}")
    if mean == "arithmetic":
        return sum(wi * si for wi, si in zip(w, scores, strict=True)) / total
    if mean == "geometric":
        return math.exp(sum(wi * math.log(max(si, EPS)) for wi, si in zip(w, scores, strict=True)) / total)
    return math.sqrt(sum(wi * max(si, 0.0) ** 2 for wi, si in zip(w, scores, strict=True)) / total)


class WeightedObjective:
    """Weighted sum of several objectives, maximized: ``sum_i w_i s_i v_i`` (see the module docstring)."""

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
        return combine_scores([self.last[o.name] for o in self.objectives], weights=self.weights,
                              directions=[o.direction for o in self.objectives])


def values(objectives: Sequence[Objective]) -> tuple[float, ...]:
    """Each objective's value, in order (directions: ``[o.direction for o in objectives]``)."""
    return tuple(o.compute() for o in objectives)
