"""Merge methods on task vectors beyond TIES and DARE: Model Stock, Model Breadcrumbs, DELLA, and
supermerger's two add-difference variants (train difference, add difference clamped to A and B).

Conventions as in :mod:`optimizer.merge.methods`: ``fn(parents, *, out, generator, **params)``
writes into ``out`` and returns it. ``model_stock``, ``breadcrumbs`` and ``della`` take the base
first, ``(C, M_1, ..., M_n)``, and work on ``d_i = M_i - C`` per tensor; ``train_difference`` and
``add_difference_clamped`` take ``(A, B, C)`` as ``add_difference`` does. fp16/bf16 data is
computed in fp32 and rounded once on the write.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from optimizer.merge.methods import (
    MULTIPLIER,
    ParamRange,
    _check_out,
    _chunks,
    _compute_dtype,
    _flat,
    merge_method,
)

#: a norm product below this is clamped in cosines; a denominator below it makes Model Stock's ratio 0 (mergekit's guards)
STOCK_EPS = 1e-6


def task_vectors(parents: Sequence[Tensor], dtype: torch.dtype) -> tuple[Tensor, list[Tensor]]:
    """``(C, [d_1, ..., d_n])``: the flat base and its flat task vectors ``d_i = M_i - C`` in ``dtype``.
    The task vectors are new tensors; ``C`` may be the parent itself and must never be written."""
    base = _flat(parents[0]).to(dtype)
    return base, [_flat(m).to(dtype, copy=True).sub_(base) for m in parents[1:]]


def _write(out: Tensor, flat: Tensor) -> Tensor:
    out.copy_(flat.view(out.shape))
    return out


def elementwise_in_chunks(parents: Sequence[Tensor], out: Tensor, formula: Callable[..., Tensor]) -> Tensor:
    """``out = formula(*parents)`` computed in fp32 (fp64 for fp64 data) chunks of
    :data:`CHUNK_ELEMENTS`, so a whole block segment never needs full-size temporaries."""
    _check_out(parents, out)
    flats = [_flat(p) for p in parents]
    target = _flat(out) if out.is_contiguous() else torch.empty(out.numel(), dtype=out.dtype, device=out.device)
    cdt = _compute_dtype(out)
    for s in _chunks(target.numel()):
        target[s].copy_(formula(*(f[s].to(cdt) for f in flats)))
    if not out.is_contiguous():
        out.copy_(target.view(out.shape))
    return out


# ---------------------------------------------------------------------------------- Model Stock
def model_stock_ratio(deltas: Sequence[Tensor]) -> float:
    """Model Stock's interpolation ratio ``t = n cos / (1 + (n - 1) cos)``, ``cos`` the mean over all
    pairs of ``clamp(<d_i, d_j> / max(|d_i| |d_j|, 1e-6), -1, 1)``; ``t = 0`` where
    ``|1 + (n - 1) cos| < 1e-6`` (no finite estimate: keep the base)."""
    n = len(deltas)
    norms = [float(torch.linalg.vector_norm(d, dtype=torch.float64)) for d in deltas]
    cosines = [max(-1.0, min(1.0, float(torch.dot(deltas[i].double(), deltas[j].double())) / max(norms[i] * norms[j], STOCK_EPS)))
               for i in range(n) for j in range(i + 1, n)]
    cos = sum(cosines) / len(cosines)
    denom = 1.0 + (n - 1) * cos
    return 0.0 if abs(denom) < STOCK_EPS else n * cos / denom


@merge_method(name="model_stock", parents=(3, 5), params={"alpha": 1.0}, ranges={"alpha": MULTIPLIER}, granularity="tensor")
def model_stock(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv 2403.19522); parents ``(C, M_1, ..., M_n)``, ``n >= 2``.

    Per tensor, ``d_i = M_i - C`` flattened; ``cos`` = the mean of ``cos(d_i, d_j)`` over all pairs
    ``i < j``; ``t = n cos / (1 + (n - 1) cos)`` (:func:`model_stock_ratio`); result
    ``C + alpha t mean_i d_i``. ``alpha = 1`` is the paper's ``w_H = t w_avg + (1 - t) w_0``.

    Source: the paper's eq. (2) as mergekit's ``model_stock`` computes it (``filter_wise: false``:
    whole tensor, all pairs; tested against mergekit). sd-mecha's ``model_stock`` takes the cosine
    per row and over consecutive pairs only; for one pair of 1-D tensors it agrees (tested).
    """
    _check_out(parents, out)
    base, deltas = task_vectors(parents, _compute_dtype(out))
    t = model_stock_ratio(deltas)
    mean = torch.stack(deltas).mean(dim=0)
    return _write(out, torch.add(base, mean, alpha=float(alpha) * t))


# ---------------------------------------------------------------------------------- Breadcrumbs
def breadcrumbs_mask(delta: Tensor, *, density: float, gamma: float) -> Tensor:
    """1.0 where ``|delta|`` ranks between the ``n_bot`` smallest and the ``n_top`` largest: with
    ``N`` entries, ``n_top = floor(gamma N)``, ``kept = floor(density N)``, ``n_bot = N - kept - n_top``
    (when negative, ``n_top`` shrinks by as much and ``n_bot = 0``). Ranks are a stable sort of ``|delta|``."""
    numel = delta.numel()
    kept, n_top = int(density * numel), int(gamma * numel)
    n_bot = numel - kept - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = torch.sort(delta.abs(), stable=True).indices
    mask = torch.zeros_like(delta)
    mask[order[n_bot : numel - n_top]] = 1.0
    return mask


@merge_method(
    name="breadcrumbs",
    parents=(2, 5),
    params={"alpha": 1.0, "density": 0.9, "gamma": 0.01},
    ranges={"alpha": MULTIPLIER, "density": ParamRange(0.0, 1.0, low_open=True), "gamma": ParamRange(0.0, 1.0, high_open=True)},
    granularity="tensor",
)
def breadcrumbs(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float, density: float,
                gamma: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795); parents ``(C, M_1, ..., M_n)``.

    Per tensor, each task vector ``d_i = M_i - C`` loses its largest-magnitude outliers (the top
    ``gamma`` fraction) and its smallest entries, keeping a ``density`` fraction
    (:func:`breadcrumbs_mask`); result ``C + alpha sum_i m_i d_i``. ``density = 1`` keeps
    everything (task arithmetic).

    Source: the paper's masked task-vector sum, as mergekit's ``breadcrumbs`` computes it (its
    ``magnitude_outliers`` sparsification, weight 1 per model, ``lambda = alpha``, no rescaling or
    normalisation; tested against mergekit).
    """
    _check_out(parents, out)
    base, deltas = task_vectors(parents, _compute_dtype(out))
    total = torch.zeros_like(base)
    for d in deltas:
        total.add_(d.mul_(breadcrumbs_mask(d, density=float(density), gamma=float(gamma))))
    return _write(out, torch.add(base, total, alpha=float(alpha)))


# ---------------------------------------------------------------------------------- DELLA
def della_keep_probability(delta: Tensor, *, drop_rate: float, epsilon: float) -> Tensor:
    """MagPrune's keep probability per entry: ``clamp((1 - p) + epsilon (r / N - (N + 1) / (2 N)), 0, 1)``
    with ``r`` the entry's ordinal rank of ``|delta|`` (1 = smallest, stable), ``N`` the entry count:
    larger changes are kept more often, the mean stays ``1 - p``."""
    numel = delta.numel()
    keep = torch.full_like(delta, 1.0 - float(drop_rate))
    if epsilon == 0.0:
        return keep
    rank = torch.empty_like(delta)
    rank[torch.sort(delta.abs(), stable=True).indices] = torch.arange(1, numel + 1, dtype=delta.dtype, device=delta.device)
    return keep.add_(rank.div_(numel).sub_((numel + 1) / (2 * numel)).mul_(float(epsilon))).clamp_(0.0, 1.0)


def disjoint_mean(deltas: Sequence[Tensor]) -> Tensor:
    """TIES' elect + disjoint merge: ``s = sign(sum_i d_i)``, ``sum_i [d_i s > 0] d_i / max(1, sum_i [d_i s > 0])``."""
    sign = torch.stack(deltas).sum(dim=0).sign_()
    acc, count = torch.zeros_like(sign), torch.zeros_like(sign)
    for d in deltas:
        agree = (d * sign).gt_(0).to(d.dtype)
        count.add_(agree)
        acc.add_(d * agree)
    return acc.div_(count.clamp_(min=1))


@merge_method(
    name="della",
    parents=(2, 5),
    params={"alpha": 1.0, "drop_rate": 0.7, "epsilon": 0.1},
    ranges={"alpha": MULTIPLIER, "drop_rate": ParamRange(0.0, 1.0, high_open=True), "epsilon": ParamRange(0.0, 1.0)},
    granularity="tensor",
    stochastic=True,
)
def della(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float, drop_rate: float,
          epsilon: float) -> Tensor:
    """DELLA-Merging (Deep et al. 2024, arXiv 2406.11617); parents ``(C, M_1, ..., M_n)``.

    Per tensor, ``d_i = M_i - C``; MagPrune: ``m_i ~ Bernoulli(q_i)`` with the magnitude-ranked keep
    probability ``q_i`` of :func:`della_keep_probability` (drawn with ``torch.bernoulli`` from
    ``generator``, model order), ``d'_i = m_i d_i / (1 - p)``; then TIES' sign election and disjoint
    mean (:func:`disjoint_mean`); result ``C + alpha mean``. ``epsilon = 0`` is DARE's dropout
    followed by TIES' election.

    Source: the paper's MagPrune + elect + fuse, as sd-mecha's ``ties_sum_with_dropout`` computes it
    (``della_eps = epsilon``, ``vote_sgn``, no top-k, no model-stock factor); same draws for the
    same generator (tested).
    """
    _check_out(parents, out)
    base, deltas = task_vectors(parents, _compute_dtype(out))
    p = float(drop_rate)
    kept = []
    for d in deltas:
        q = della_keep_probability(d, drop_rate=p, epsilon=float(epsilon))
        kept.append(d.mul_(torch.bernoulli(q, generator=generator)).div_(1.0 - p))
    return _write(out, torch.add(base, disjoint_mean(kept), alpha=float(alpha)))


# ---------------------------------------------------------------------------------- add-difference variants
#: supermerger's Train Difference scale (its ``alpha * 1.8``)
TRAIN_DIFFERENCE_SCALE = 1.8


def _train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    towards_a, from_base = (b - a).abs(), (b - c).abs()
    total = towards_a + from_base
    scale = torch.where(total != 0, towards_a / total.masked_fill(total == 0, 1), torch.zeros_like(total))
    return a + (TRAIN_DIFFERENCE_SCALE * alpha) * scale * (b - c)


@merge_method(name="train_difference", parents=(3, 3), params={"alpha": 1.0}, ranges={"alpha": MULTIPLIER}, granularity="elementwise")
def train_difference(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float) -> Tensor:
    """Train difference: ``A + 1.8 alpha |B - A| / (|B - A| + |B - C|) (B - C)`` elementwise (``0/0 = 0``).

    Adds B's difference from C where B differs from A and damps it where A already moved that way,
    as if A had been trained on what made B from C.

    Source: supermerger's "Train Difference" (hako-mikan/sd-webui-supermerger ``traindiff``) and
    sd-mecha's ``train_difference_mask`` (tested against sd-mecha).
    """
    return elementwise_in_chunks(parents, out, lambda a, b, c: _train_difference(a, b, c, alpha=float(alpha)))


def _clamped_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float) -> Tensor:
    return torch.minimum(torch.maximum(torch.add(a, b - c, alpha=alpha), torch.minimum(a, b)), torch.maximum(a, b))


@merge_method(name="add_difference_clamped", parents=(3, 3), params={"alpha": 1.0}, ranges={"alpha": MULTIPLIER}, granularity="elementwise")
def add_difference_clamped(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float) -> Tensor:
    """Add difference clamped to A and B: ``clamp(A + alpha (B - C), min(A, B), max(A, B))`` elementwise.

    The added difference never takes a weight outside the range A and B span, so a large ``alpha``
    cannot blow up a weight.

    Source: sd-mecha's ``add_difference(..., clamp_to_ab=True)`` (``clamp(res, a, b)``; tested against sd-mecha).
    """
    return elementwise_in_chunks(parents, out, lambda a, b, c: _clamped_difference(a, b, c, alpha=float(alpha)))
