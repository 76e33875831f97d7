"""Quality figures of a text-to-image model on the zoo domain, on held-out captions.

For a fixed evaluation set (``count`` samples of ``test`` source images with **held-out** caption
combinations, fixed seeds) a model renders one image per caption; the figures are

* oracle accuracy per attribute (digit, fg, bg, thickness, slant) and ``all`` (all five right);
* CLIP score with the zoo's CLIP: ``100 * max(cos(image, caption), 0)``, mean over images;
* FID against real renders of the same captions, with the FID InceptionV3 (torchmetrics'
  ``FrechetInceptionDistance`` formula, :mod:`objectives.frechet`; with a few hundred images FID is biased upwards, so compare rows
  of one table, measured with the same ``count``, never with published FIDs).

The real renders themselves are scored the same way (the ``real`` row): the ceiling of the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from objectives.frechet import FrechetDistance
from objectives.inception import InceptionFeatures
from optimizer.zoo import domain
from optimizer.zoo.clip_model import clip_score
from optimizer.zoo.oracle import Oracle

Generator = Callable[[list[str], list[int]], torch.Tensor]  # (captions, seeds) -> [N,3,32,32] in [0,1]


@dataclass(frozen=True)
class EvaluationSet:
    """Held-out captions with their seeds and the real renders they describe."""

    samples: list[domain.Sample]
    seeds: list[int]
    real: torch.Tensor

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]


def evaluation_set(*, count: int, seed: int = 7) -> EvaluationSet:
    """``count`` held-out-caption samples on test images, with per-sample generation seeds."""
    items = domain.samples(images="test", captions="held_out", count=count, seed=seed)
    real = domain.render([s.index for s in items], [s.attributes for s in items])
    return EvaluationSet(samples=items, seeds=[seed * 100_000 + i for i in range(count)], real=real)


class QualityMeter:
    """Scores images against an evaluation set; the heavy scorers are built once."""

    def __init__(self, *, evaluation: EvaluationSet, oracle: Oracle, clip_model: torch.nn.Module, clip_tokenizer: object) -> None:
        self.evaluation = evaluation
        self.oracle = oracle
        self.clip_model = clip_model
        self.clip_tokenizer = clip_tokenizer
        # the real statistics are computed once
        self.fid = FrechetDistance.from_images(feature=InceptionFeatures(), images=self.evaluation.real)

    def _fid(self, images: torch.Tensor) -> float:
        self.fid.reset()
        self.fid.update(images)
        return self.fid.compute()

    def score(self, images: torch.Tensor, *, fid: bool = True) -> dict[str, float]:
        """Oracle accuracies, CLIP score and (optionally) FID of ``images`` for the evaluation set."""
        if images.shape != self.evaluation.real.shape:
            raise ValueError(f"expected images of shape {tuple(self.evaluation.real.shape)}, got {tuple(images.shape)}")
        attrs = [s.attributes for s in self.evaluation.samples]
        figures = {f"oracle_{k}": float(v) for k, v in self.oracle.accuracy(images, attrs).items()}
        scores = clip_score(self.clip_model, self.clip_tokenizer, images, self.evaluation.captions)
        figures["clip_score"] = float(scores.mean())
        if fid:
            figures["fid"] = self._fid(images)
        return figures

    def score_generator(self, generate: Generator, *, fid: bool = True) -> dict[str, float]:
        images = generate(self.evaluation.captions, self.evaluation.seeds)
        return self.score(images, fid=fid)
