"""The sanity gate: does each scorer prefer real renders to noise, flat images and wrong captions?

Scorers can lie (an aesthetic scorer that gives 0.99 to images that are 80% noise; a whole search
then optimizes toward noise). At study start each objective scores a small calibration set:

* ``parents``: the parents' own renders of the first search prompts, with their captions;
* ``shuffled``: the same renders with the captions rotated so that each image gets another
  prompt's caption (only for scorers that read prompts, ``uses_prompts``);
* ``noise``: uniform noise images (seeded) with the real captions;
* ``flat``: mid-grey images with the real captions.

The margin against each foil is ``s (v_parents - v_foil)`` (``s`` = +1 maximize, -1 minimize), so
a positive margin means the scorer ranks the real renders better. The gate fails an objective whose
margin against any foil is at or below zero. ``parents`` and ``noise`` are also the anchors of the
normalised combination (:mod:`objectives.combine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from objectives.base import Objective
from objectives.combine import sign

__all__ = ["CalibrationScores", "calibrate", "flat_images", "gate_failures", "noise_images", "shuffled_captions"]


@dataclass(frozen=True)
class CalibrationScores:
    """One objective's scores of the calibration set and its margins (see the module docstring)."""

    name: str
    direction: str
    parents: float
    noise: float
    flat: float
    shuffled: float | None  # None: the scorer does not read prompts

    @property
    def margins(self) -> dict[str, float]:
        s = sign(self.direction)
        foils = {"noise": self.noise, "flat": self.flat, "shuffled": self.shuffled}
        return {k: s * (self.parents - v) for k, v in foils.items() if v is not None}

    def as_dict(self) -> dict:
        return {**asdict(self), "margins": self.margins}

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationScores:
        return cls(**{k: data[k] for k in ("name", "direction", "parents", "noise", "flat", "shuffled")})


def noise_images(like: Tensor, *, seed: int) -> Tensor:
    """Uniform noise in [0, 1] of ``like``'s shape (CPU generator, so every machine draws the same)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(like.shape, generator=generator).to(like.device, like.dtype)


def flat_images(like: Tensor) -> Tensor:
    """Mid-grey images of ``like``'s shape."""
    return torch.full_like(like, 0.5)


def shuffled_captions(prompts: Sequence[str]) -> list[str]:
    """Each caption replaced by another image's: the distinct captions rotated by one, so no image
    keeps its own caption when there are at least two distinct captions."""
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < 2:
        return list(prompts)
    shift = {c: distinct[(i + 1) % len(distinct)] for i, c in enumerate(distinct)}
    return [shift[p] for p in prompts]


def _score(objective: Objective, images: Tensor, prompts: Sequence[str], *, batch_size: int) -> float:
    objective.reset()
    for start in range(0, len(images), batch_size):
        objective.update(images[start : start + batch_size], prompts=list(prompts[start : start + batch_size]))
    return float(objective.compute())


def calibrate(objectives: Sequence[Objective], *, images: Tensor, prompts: Sequence[str], seed: int = 0,
              batch_size: int = 16) -> list[CalibrationScores]:
    """Score the calibration set built from ``images`` (the parents' renders, ``[N, 3, H, W]`` in
    [0, 1]) and their ``prompts`` with every objective."""
    if len(images) != len(prompts) or len(images) < 2:
        raise ValueError(f"calibration needs at least 2 images with one prompt each, got {len(images)} images and {len(prompts)} prompts")
    noise, flat, wrong = noise_images(images, seed=seed), flat_images(images), shuffled_captions(prompts)
    out = []
    for o in objectives:
        uses_prompts = getattr(o, "uses_prompts", True)
        out.append(CalibrationScores(
            name=o.name, direction=o.direction,
            parents=_score(o, images, prompts, batch_size=batch_size),
            noise=_score(o, noise, prompts, batch_size=batch_size),
            flat=_score(o, flat, prompts, batch_size=batch_size),
            shuffled=_score(o, images, wrong, batch_size=batch_size) if uses_prompts and wrong != list(prompts) else None,
        ))
    return out


def gate_failures(scores: Sequence[CalibrationScores]) -> list[str]:
    """One sentence per objective that ranks a foil at or above the parents' renders."""
    failures = []
    for s in scores:
        bad = [k for k, m in s.margins.items() if not m > 0]
        if bad:
            foils = ", ".join(f"{k} {getattr(s, k):.4g}" for k in bad)
            failures.append(f"{s.name} does not rank the parents' renders ({s.parents:.4g}) above {' / '.join(bad)} ({foils})")
    return failures
