"""Weighted single objective and the tuple for multi-objective search."""

from __future__ import annotations

import pytest
import torch

from objectives.base import Objective
from objectives.combine import WeightedObjective, values


class Mean:
    """A toy objective: mean pixel value (maximize) or its negative twin (minimize)."""

    def __init__(self, name: str, direction: str, scale: float = 1.0) -> None:
        self.name, self.direction, self.scale = name, direction, scale
        self.reset()

    def reset(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, images: torch.Tensor, *, prompts=()) -> None:
        self.total += float(images.mean(dim=(1, 2, 3)).sum()) * self.scale
        self.count += len(images)

    def compute(self) -> float:
        return self.total / self.count


def test_weighted_objective_signs_minimized_terms_and_feeds_every_objective() -> None:
    up, down = Mean("clip", "maximize", 10.0), Mean("fid", "minimize", 100.0)
    combined = WeightedObjective([up, down], [1.0, 0.1])
    assert isinstance(combined, Objective) and combined.direction == "maximize"
    images = torch.full((4, 3, 8, 8), 0.5)
    combined.update(images[:2], prompts=["a"] * 2)
    combined.update(images[2:], prompts=["a"] * 2)
    assert combined.compute() == pytest.approx(1.0 * 5.0 - 0.1 * 50.0)
    assert combined.last == {"clip": 5.0, "fid": 50.0}
    assert values([up, down]) == (5.0, 50.0)
    combined.reset()
    assert up.count == down.count == 0


def test_weighted_objective_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="one weight per objective"):
        WeightedObjective([Mean("a", "maximize")], [1.0, 2.0])
    with pytest.raises(ValueError, match="unique"):
        WeightedObjective([Mean("a", "maximize"), Mean("a", "minimize")], [1.0, 1.0])
    with pytest.raises(ValueError, match="direction must be"):
        WeightedObjective([Mean("a", "sideways")], [1.0])
