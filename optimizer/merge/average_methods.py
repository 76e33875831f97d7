"""Merge methods that average many models without a base: the plain mean and the geometric median.

Conventions as in :mod:`optimizer.merge.methods`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from optimizer.merge.methods import _check_out, _compute_dtype, _flat, merge_method

#: Weiszfeld's settings, as sd-mecha's ``geometric_median`` defaults
MEDIAN_EPS, MEDIAN_MAXITER, MEDIAN_FTOL = 1e-6, 100, 1e-20


def _n_average_coefficients(n_parents: int, params: Mapping[str, float]) -> tuple[float, ...]:
    return (1.0 / n_parents,) * n_parents


@merge_method(name="n_average", parents=(2, 5), params={}, granularity="elementwise", coefficients=_n_average_coefficients)
def n_average(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The mean of all parents: ``(P_1 + ... + P_n) / n`` (no parameter; a "model soup").

    Source: sd-mecha's ``n_average`` and supermerger's multi-model average (tested against sd-mecha).
    """
    _check_out(parents, out)
    torch.mul(parents[0], 1.0 / len(parents), out=out)
    for parent in parents[1:]:
        out.add_(parent, alpha=1.0 / len(parents))
    return out


def weiszfeld(points: Sequence[Tensor], *, eps: float = MEDIAN_EPS, maxiter: int = MEDIAN_MAXITER, ftol: float = MEDIAN_FTOL) -> Tensor:
    """The geometric median ``argmin_m sum_i ||P_i - m||`` by Weiszfeld's iteration from the mean:
    ``w_i = 1 / max(||P_i - m||, eps)``, ``m = sum_i w_i P_i / sum_i w_i``, until the mean distance
    changes by at most ``ftol`` of itself or ``maxiter`` steps."""
    stacked = torch.stack(list(points))
    median = stacked.mean(dim=0)
    objective = float(torch.linalg.vector_norm(stacked - median, dim=1).mean())
    weights = torch.ones(len(points), dtype=stacked.dtype, device=stacked.device)
    for _ in range(maxiter):
        weights = 1.0 / torch.linalg.vector_norm(stacked - median, dim=1).clamp(min=eps)
        median = (weights[:, None] * stacked).sum(dim=0) / weights.sum()
        previous, objective = objective, float(torch.linalg.vector_norm(stacked - median, dim=1).mean())
        if abs(previous - objective) <= ftol * objective:
            break
    return (weights[:, None] * stacked).sum(dim=0) / weights.sum()


@merge_method(name="geometric_median", parents=(2, 5), params={}, granularity="tensor")
def geometric_median(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Geometric median of the parents per tensor (no parameter): ``argmin_m sum_i ||P_i - m||``
    over the flattened tensors, by Weiszfeld's iteration (:func:`weiszfeld`; eps 1e-6, at most 100
    steps). Robust to one outlying model, unlike the mean; with 2 parents it is their mean.

    Source: Weiszfeld (1937) as in Pillutla et al., "Robust Aggregation for Federated Learning"
    (geom_median), and sd-mecha's ``geometric_median`` (same settings; tested against sd-mecha).
    """
    _check_out(parents, out)
    cdt = _compute_dtype(out)
    out.copy_(weiszfeld([_flat(p).to(cdt) for p in parents]).view(out.shape))
    return out
