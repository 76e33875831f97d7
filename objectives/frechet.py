"""The Fréchet distance of generated images' features against fixed reference statistics (FID).

``FID = |mu_r - mu_g|^2 + tr(S_r) + tr(S_g) - 2 tr sqrt(S_r S_g)``, with unbiased covariances
(``n - 1``), as torchmetrics' ``FrechetInceptionDistance`` computes it with a custom feature module
(which gets the float images in [0, 1] as they are: torchmetrics quantises to ``uint8`` only for
its own Inception).

The trace term is computed without a ``d x d`` eigendecomposition when there are fewer generated
images than feature dimensions (a study's or an evaluation's tens of images against Inception's
2048 dimensions). With ``Y`` the centred generated features (``n x d``), ``S_g = Y^T Y / (n - 1)``,
and the non-zero eigenvalues of ``S_r S_g`` are those of the symmetric positive semi-definite
``n x n`` matrix ``Y S_r Y^T / (n - 1)`` (``AB`` and ``BA`` share them), so
``tr sqrt(S_r S_g) = sum sqrt(eigvalsh(Y S_r Y^T / (n - 1)))``: exact, and about 700x faster than
torchmetrics' ``eigvals(S_r @ S_g)`` at 16 images and 2048 dimensions on 2 CPU cores. With ``n > d``
the ``d x d`` route is taken. ``tests/test_objectives_fid.py`` checks both against torchmetrics.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["FrechetDistance", "frechet_distance"]


def frechet_distance(*, mean: Tensor, cov: Tensor, features: Tensor) -> float:
    """FID of ``features`` (``[n >= 2, d]``) against a reference with ``mean`` and unbiased ``cov`` (see the module docstring)."""
    g = features.double()
    n, d = g.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 generated feature rows, got {n}")
    mean_r, cov_r = mean.double(), cov.double()
    mean_g = g.mean(0)
    centred = g - mean_g
    if n <= d:
        small = centred @ cov_r @ centred.T / (n - 1)
        root_trace = torch.linalg.eigvalsh((small + small.T) / 2).clamp(min=0).sqrt().sum()
        trace_g = (centred * centred).sum() / (n - 1)
    else:
        cov_g = centred.T @ centred / (n - 1)
        root_trace = torch.linalg.eigvals(cov_r @ cov_g).sqrt().real.sum()
        trace_g = cov_g.trace()
    return float(((mean_r - mean_g) ** 2).sum() + cov_r.trace() + trace_g - 2 * root_trace)


def _statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    f = features.double()
    mean = f.mean(0)
    centred = f - mean
    return mean, centred.T @ centred / (len(f) - 1)


class FrechetDistance:
    """FID of the images seen since :meth:`reset` against reference features fixed at construction
    (torchmetrics' ``FrechetInceptionDistance(normalize=True, reset_real_features=False)``, faster)."""

    def __init__(self, *, feature: nn.Module, reference: Tensor) -> None:
        if reference.ndim != 2 or len(reference) < 2:
            raise ValueError(f"reference features must be [N >= 2, D], got {tuple(reference.shape)}")
        self.feature = feature
        self.mean, self.cov = _statistics(reference)
        self._features: list[Tensor] = []

    @classmethod
    def from_images(cls, *, feature: nn.Module, images: Tensor, batch_size: int = 64) -> FrechetDistance:
        """Reference statistics of ``images`` in [0, 1]."""
        return cls(feature=feature, reference=cls.features_of(feature, images, batch_size=batch_size))

    @staticmethod
    @torch.no_grad()
    def features_of(feature: nn.Module, images: Tensor, *, batch_size: int = 64) -> Tensor:
        chunks = []
        for i in range(0, len(images), batch_size):
            out = feature(images[i : i + batch_size].clamp(0, 1))
            chunks.append((out.unsqueeze(0) if out.ndim == 1 else out).double().cpu())
        return torch.cat(chunks)

    @property
    def count(self) -> int:
        return sum(len(f) for f in self._features)

    def reset(self) -> None:
        self._features = []

    def update(self, images: Tensor) -> None:
        self._features.append(self.features_of(self.feature, images))

    def compute(self) -> float:
        features = torch.cat(self._features)
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(f"reference features are {self.mean.shape[0]}-d, the feature extractor gives {features.shape[1]}-d")
        return frechet_distance(mean=self.mean, cov=self.cov, features=features)
