"""Merge methods: pure tensor functions registered by name.

Convention: parent 0 is ``A`` (the primary model). ``alpha`` is the weight of ``B``:
``weighted_sum`` with ``alpha = 0`` gives ``A``, with ``alpha = 1`` gives ``B``. Methods built
on task vectors (``add_difference``'s ``C``, ``ties``, ``dare``) take the common base first.

Every method has the signature::

    fn(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None, **params: float) -> Tensor

It writes its result into ``out`` (same shape and dtype as the parents; possibly a view into a
large buffer; never aliasing a parent) and returns ``out``. It has no other side effect: parents
are never modified and the only randomness comes from ``generator``.

``granularity`` says how the kernel may call a method:

* ``"elementwise"``: the result at each position depends only on the parents at that position,
  so the kernel may call it once on a whole block segment (many tensors concatenated, flat).
* ``"tensor"``: the method uses whole-tensor statistics (norms, top-k, random masks), so it is
  called once per tensor, with the tensor's shape.

fp32 is computed in place in the buffers' dtype. For fp16/bf16, ``weighted_sum`` and
``add_difference`` stay in the storage dtype (PyTorch computes each element in fp32 internally
and rounds once per pass, which keeps them bandwidth-bound); ``ties``, ``dare`` and ``slerp``
compute in fp32 (per tensor or in chunks) and round once on the final write.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol

import torch
from torch import Tensor

from optimizer.merge.errors import MergeMethodError

Granularity = Literal["elementwise", "tensor"]

#: Elements per fp32 work chunk for methods that upcast fp16/bf16 data (16 MiB of fp32).
CHUNK_ELEMENTS = 1 << 22


class MergeFn(Protocol):
    def __call__(self, parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None, **params: float) -> Tensor: ...


#: ``coefficients(n_parents, params) -> (c_0, ..., c_{n-1})`` of a linear method: ``out = sum_i c_i P_i``.
Coefficients = Callable[[int, Mapping[str, float]], tuple[float, ...]]


@dataclass(frozen=True)
class ParamRange:
    """Allowed values of one parameter: an interval, each end open or closed (always finite)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        left = "(" if self.low_open or self.low == -math.inf else "["
        right = ")" if self.high_open or self.high == math.inf else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


FINITE = ParamRange()
#: an interpolation weight: 0 gives the first model, 1 the other (past either end is extrapolation,
#: which an interpolating method refuses: add_difference / task arithmetic extrapolate on purpose)
UNIT = ParamRange(0.0, 1.0)
#: a task-vector multiplier: 1 adds the whole difference; beyond +-3 no published merge goes
MULTIPLIER = ParamRange(-3.0, 3.0)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    ``params`` maps every parameter name to its default. ``per_parent`` lists, in order, the
    parameters that only exist when enough parents are given: ``per_parent[i]`` is the weight of
    parent ``i + 1`` (``weighted_sum``: alpha for B, beta for C, ...). ``stochastic`` methods
    draw from the generator the kernel passes (seeded per tensor, see :func:`tensor_seed`).
    ``coefficients`` is set for *linear* methods, whose result is ``sum_i c_i P_i`` with
    coefficients that depend only on the parameters: the fused GPU kernel
    (:mod:`optimizer.merge.fused`) computes those in one pass, in fp32, rounding once.
    """

    name: str
    fn: MergeFn
    min_parents: int
    max_parents: int
    params: Mapping[str, float]
    granularity: Granularity
    doc: str
    ranges: Mapping[str, ParamRange] = field(default_factory=dict)
    per_parent: tuple[str, ...] = ()
    stochastic: bool = False
    coefficients: Coefficients | None = None

    def param_names(self, n_parents: int) -> tuple[str, ...]:
        """The parameters this method takes with ``n_parents`` parents, in declaration order."""
        self.check_parents(n_parents)
        used_per_parent = set(self.per_parent[: n_parents - 1])
        return tuple(p for p in self.params if p not in self.per_parent or p in used_per_parent)

    def check_parents(self, n_parents: int) -> None:
        if not self.min_parents <= n_parents <= self.max_parents:
            want = str(self.min_parents) if self.min_parents == self.max_parents else f"{self.min_parents} to {self.max_parents}"
            raise MergeMethodError(f"merge method {self.name!r} takes {want} parents, got {n_parents}")

    def check_value(self, param: str, value: float, *, block: str | None = None) -> None:
        """Raise :class:`MergeMethodError` naming ``param`` (and ``block``) if ``value`` is out of range."""
        if param not in self.params:
            raise MergeMethodError(f"merge method {self.name!r} has no parameter {param!r}; it takes {', '.join(self.params)}")
        allowed = self.ranges.get(param, FINITE)
        if not allowed.contains(float(value)):
            where = f" for block {block}" if block is not None else ""
            raise MergeMethodError(f"{self.name}: parameter {param!r}{where} must be {allowed.describe()}, got {value!r}")

    def check_params(self, params: Mapping[str, float], *, n_parents: int, block: str | None = None) -> None:
        """Check that ``params`` is exactly the set this method takes with ``n_parents``, all in range."""
        wanted = self.param_names(n_parents)
        where = f" for block {block}" if block is not None else ""
        missing = [p for p in wanted if p not in params]
        if missing:
            raise MergeMethodError(f"{self.name}: missing parameter(s) {missing}{where}")
        extra = [p for p in params if p not in wanted]
        if extra:
            raise MergeMethodError(f"{self.name} with {n_parents} parents does not take parameter(s) {extra}{where}; it takes {list(wanted)}")
        for name in wanted:
            self.check_value(name, params[name], block=block)

    def __call__(self, parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, **params: float) -> Tensor:
        return self.fn(parents, out=out, generator=generator, **params)


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    *,
    name: str,
    parents: tuple[int, int],
    params: Mapping[str, float],
    granularity: Granularity,
    ranges: Mapping[str, ParamRange] | None = None,
    per_parent: tuple[str, ...] = (),
    stochastic: bool = False,
    coefficients: Coefficients | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` as merge method ``name`` taking ``parents=(min, max)`` parents.

    Pass ``coefficients`` only for a linear elementwise method (its result must equal
    ``sum_i c_i P_i``; the kernel then may compute it with the fused kernel instead of ``fn``)."""
    lo, hi = parents
    if not 1 <= lo <= hi:
        raise ValueError(f"{name}: bad parent range {parents}")
    if granularity not in ("elementwise", "tensor"):
        raise ValueError(f"{name}: granularity must be 'elementwise' or 'tensor', got {granularity!r}")
    if coefficients is not None and (granularity != "elementwise" or stochastic):
        raise ValueError(f"{name}: only a deterministic elementwise method can be linear (coefficients=)")
    unknown = set(ranges or {}) | set(per_parent)
    unknown -= set(params)
    if unknown:
        raise ValueError(f"{name}: ranges/per_parent name unknown parameters {sorted(unknown)}")

    def register(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = MergeMethod(
            name=name,
            fn=fn,
            min_parents=lo,
            max_parents=hi,
            params=MappingProxyType(dict(params)),
            granularity=granularity,
            doc=(fn.__doc__ or "").strip(),
            ranges=MappingProxyType(dict(ranges or {})),
            per_parent=per_parent,
            stochastic=stochastic,
            coefficients=coefficients,
        )
        return fn

    return register


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; the error lists the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MergeMethodError(f"unknown merge method {name!r}; known: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Names of all registered merge methods, sorted."""
    return sorted(_REGISTRY)


def tensor_seed(seed: int, key: str) -> int:
    """Seed of the generator used for tensor ``key`` by stochastic methods.

    Derived from the recipe seed and the key *name* (not its position), so a key gets the same
    random mask whatever the order or subset of keys, in the kernel and in the reference.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunks(numel: int, size: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _check_out(parents: Sequence[Tensor], out: Tensor) -> None:
    for p in parents:
        if p.shape != out.shape:
            raise MergeMethodError(f"parent shape {tuple(p.shape)} does not match output shape {tuple(out.shape)}")


# --------------------------------------------------------------------------------------------
# elementwise methods


def _weighted_sum_coefficients(n_parents: int, params: Mapping[str, float]) -> tuple[float, ...]:
    weights = [float(params[n]) for n in ("alpha", "beta", "gamma", "delta")[: n_parents - 1]]
    return (1.0 - sum(weights), *weights)


def _add_difference_coefficients(n_parents: int, params: Mapping[str, float]) -> tuple[float, ...]:
    alpha = float(params["alpha"])
    return (1.0, alpha, -alpha)


@merge_method(
    name="weighted_sum",
    parents=(2, 5),
    params={"alpha": 0.5, "beta": 0.0, "gamma": 0.0, "delta": 0.0},
    per_parent=("alpha", "beta", "gamma", "delta"),
    ranges=dict.fromkeys(("alpha", "beta", "gamma", "delta"), UNIT),
    granularity="elementwise",
    coefficients=_weighted_sum_coefficients,
)
def weighted_sum(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, **params: float) -> Tensor:
    """Weighted sum; ``alpha`` is the weight of B.

    2 parents: ``(1 - alpha) A + alpha B`` (one ``torch.lerp`` pass: exact A at 0, exact B at 1).
    n parents: ``(1 - alpha - beta - ...) A + alpha B + beta C + gamma D + delta E`` (one pass per
    parent with a non-zero weight; fp16/bf16 round once per pass).

    Source: A1111's Checkpoint Merger "Weighted sum" (``A * (1 - M) + B * M``) and sd-mecha's ``weighted_sum``.
    """
    _check_out(parents, out)
    names = ("alpha", "beta", "gamma", "delta")[: len(parents) - 1]
    weights = [float(params[n]) for n in names]
    if len(parents) == 2:
        return torch.lerp(parents[0], parents[1], weights[0], out=out)
    torch.mul(parents[0], 1.0 - sum(weights), out=out)
    for parent, w in zip(parents[1:], weights, strict=True):
        if w != 0.0:
            out.add_(parent, alpha=w)
    return out


@merge_method(
    name="add_difference", parents=(3, 3), params={"alpha": 1.0}, ranges={"alpha": MULTIPLIER}, granularity="elementwise",
    coefficients=_add_difference_coefficients,
)
def add_difference(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float) -> Tensor:
    """Add difference: ``A + alpha (B - C)`` (two passes: ``out = B - C``, then ``out = A + alpha out``).

    Source: A1111's Checkpoint Merger "Add difference" (``A + (B - C) * M``); task arithmetic
    (Ilharco et al. 2023, arXiv 2212.04089) with one task vector.
    """
    _check_out(parents, out)
    a, b, c = parents
    torch.sub(b, c, out=out)
    return torch.add(a, out, alpha=float(alpha), out=out)


# --------------------------------------------------------------------------------------------
# tensor methods (whole-tensor statistics), computed in fp32 for half inputs


@merge_method(
    name="ties",
    parents=(2, 5),
    params={"alpha": 1.0, "density": 0.2},
    ranges={"alpha": MULTIPLIER, "density": ParamRange(0.0, 1.0, low_open=True)},
    granularity="tensor",
)
def ties(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float, density: float) -> Tensor:
    """TIES-merging (arXiv 2306.01708); parents are ``(C, M_1, ..., M_n)`` with C the base.

    ``d_i = M_i - C``; trim: keep the entries of ``d_i`` whose ``|d_i|`` is among the top
    ``density`` fraction of the tensor (``k = ceil(density * numel)``; entries tied with the k-th
    largest magnitude are kept too), zero the rest; elect ``s = sign(sum_i d_i)`` over the trimmed
    deltas; disjoint mean ``m = sum_i [d_i s > 0] d_i / max(1, sum_i [d_i s > 0])``;
    result ``C + alpha m``.

    Source: Yadav et al. 2023 (arXiv 2306.01708), algorithm 1; equals mergekit's ``ties`` where
    ``density * numel`` is whole (tested).
    """
    _check_out(parents, out)
    base, models = parents[0], parents[1:]
    cdt = _compute_dtype(out)
    c = _flat(base).to(cdt)  # may be the parent itself: never written
    numel = c.numel()
    deltas = []
    scratch = torch.empty_like(c)
    for m in models:
        d = _flat(m).to(cdt, copy=True).sub_(c)
        if density < 1.0:
            k = min(numel, max(1, math.ceil(density * numel)))
            torch.abs(d, out=scratch)
            # k-th largest magnitude == (numel - k + 1)-th smallest
            threshold = torch.kthvalue(scratch, numel - k + 1).values
            d.mul_(scratch.ge_(threshold))
        deltas.append(d)
    sign = deltas[0].clone()
    for d in deltas[1:]:
        sign.add_(d)
    sign.sign_()
    acc = torch.zeros_like(c)
    count = torch.zeros_like(c)
    for d in deltas:
        agree = torch.mul(d, sign, out=scratch).gt_(0)  # 1.0 where d != 0 has the elected sign
        count.add_(agree)
        acc.add_(d.mul_(agree))
    acc.div_(count.clamp_(min=1)).mul_(float(alpha)).add_(c)
    out.copy_(acc.view(out.shape))
    return out


@merge_method(
    name="dare",
    parents=(2, 5),
    params={"alpha": 1.0, "drop_rate": 0.9},
    ranges={"alpha": MULTIPLIER, "drop_rate": ParamRange(0.0, 1.0, high_open=True)},
    granularity="tensor",
    stochastic=True,
)
def dare(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float, drop_rate: float) -> Tensor:
    """DARE (arXiv 2311.03099); parents are ``(C, M_1, ..., M_n)`` with C the base.

    ``d_i = M_i - C``, ``d'_i = m_i d_i / (1 - p)`` with ``m_i ~ Bernoulli(1 - p)`` elementwise
    (``p = drop_rate``), drawn as ``m_i = [u_i >= p]``, ``u_i ~ U[0, 1)`` from ``generator``, one
    tensor-sized draw per model in model order (``uniform_`` is ~4x faster than ``bernoulli_`` on
    CPU); result ``C + alpha mean_i d'_i``. ``drop_rate = 0`` draws no random numbers.

    Source: Yu et al. 2023 (arXiv 2311.03099), drop and rescale, averaged as mergekit's ``dare_linear``
    with normalised weights.
    """
    _check_out(parents, out)
    base, models = parents[0], parents[1:]
    cdt = _compute_dtype(out)
    c = _flat(base).to(cdt)  # may be the parent itself: never written
    p = float(drop_rate)
    acc = torch.zeros_like(c)
    mask = torch.empty_like(c) if p > 0.0 else None
    for m in models:
        d = _flat(m).to(cdt, copy=True).sub_(c)
        if mask is not None:
            mask.uniform_(0.0, 1.0, generator=generator)
            d.mul_(mask.ge_(p))
        acc.add_(d)
    acc.mul_(float(alpha) / ((1.0 - p) * len(models))).add_(c)
    out.copy_(acc.view(out.shape))
    return out


#: slerp falls back to lerp when ``|cos W| > 1 - SLERP_PARALLEL_EPS`` (or a norm is 0).
SLERP_PARALLEL_EPS = 1e-6


class _Upcast:
    """Reusable fp32 (fp64 for fp64 data) scratch for chunk-wise work on a pair of flat tensors.

    For fp32/fp64 data, chunks are views of the data itself (no copy); callers must then not
    write into them."""

    def __init__(self, a: Tensor, b: Tensor) -> None:
        self.a, self.b = a, b
        self.dtype = _compute_dtype(a)
        self.direct = a.dtype == self.dtype and b.dtype == self.dtype
        if not self.direct:
            size = min(a.numel(), CHUNK_ELEMENTS)
            self._x = torch.empty(size, dtype=self.dtype, device=a.device)
            self._y = torch.empty(size, dtype=self.dtype, device=a.device)

    def __iter__(self) -> Iterator[tuple[slice, Tensor, Tensor]]:
        for s in _chunks(self.a.numel()):
            if self.direct:
                yield s, self.a[s], self.b[s]
            else:
                n = s.stop - s.start
                x, y = self._x[:n], self._y[:n]
                x.copy_(self.a[s])
                y.copy_(self.b[s])
                yield s, x, y


def _dot_and_norms(pair: _Upcast) -> tuple[float, float, float]:
    """``(<a, b>, |a|^2, |b|^2)``: fp32 (fp64 for fp64 data) chunk sums accumulated in fp64 on the
    data's device, read back once (one device sync per tensor)."""
    sums = torch.zeros(3, dtype=torch.float64, device=pair.a.device)
    for _, x, y in pair:
        sums += torch.stack([torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)]).to(torch.float64)
    dot, aa, bb = sums.tolist()
    return dot, aa, bb


@merge_method(name="slerp", parents=(2, 2), params={"alpha": 0.5}, ranges={"alpha": UNIT}, granularity="tensor")
def slerp(parents: Sequence[Tensor], *, out: Tensor, generator: torch.Generator | None = None, alpha: float) -> Tensor:
    """Spherical interpolation per tensor, ``t = alpha``.

    ``W = arccos(<A, B> / (|A| |B|))`` over the flattened tensor; result
    ``[sin((1 - t) W) A + sin(t W) B] / sin W``. Falls back to ``(1 - t) A + t B`` when a norm is 0
    or ``|cos W| > 1 - 1e-6`` (nearly parallel or anti-parallel). fp16/bf16 data is processed in
    fp32 chunks (dot products and the combination), rounded once on the write.

    Source: Shoemake 1985 ("Animating rotation with quaternion curves"), per tensor as in
    supermerger's and mergekit's ``slerp``.
    """
    _check_out(parents, out)
    a, b = _flat(parents[0]), _flat(parents[1])
    o = _flat(out) if out.is_contiguous() else None
    target = o if o is not None else torch.empty(a.shape, dtype=out.dtype, device=out.device)
    t = float(alpha)
    pair = _Upcast(a, b)
    dot, aa, bb = _dot_and_norms(pair)
    use_lerp = aa == 0.0 or bb == 0.0
    if not use_lerp:
        cos = max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))
        use_lerp = abs(cos) > 1.0 - SLERP_PARALLEL_EPS
    if use_lerp and pair.direct:
        torch.lerp(a, b, t, out=target)
    elif use_lerp:
        for s, x, y in pair:
            target[s].copy_(x.lerp_(y, t))
    else:
        omega = math.acos(cos)
        sin_omega = math.sin(omega)
        ca, cb = math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
        if pair.direct:
            torch.mul(a, ca, out=target).add_(b, alpha=cb)
        else:
            for s, x, y in pair:
                target[s].copy_(x.mul_(ca).add_(y, alpha=cb))
    if o is None:
        out.copy_(target.view(out.shape))
    return out
