"""The search space: a study's :class:`ParamSpace` entries bound to a block layout and a method.

:func:`suggest_recipe` is a pure function of the trial: it only calls ``trial.suggest_float`` and
builds a :class:`~optimizer.merge.MergeRecipe`, so ``optuna.trial.FixedTrial(trial.params)``
replays any trial's recipe exactly.

Optuna parameter names: ``<param>`` for a global value, ``<param>.<BLOCK>`` for one block,
``<param>.<GROUP>`` for a group of tied blocks; LoRA strengths ``lora.<name>`` (or
``lora.<name>.<BLOCK>`` / ``.<GROUP>``, over the blocks the LoRA touches, times its LBW factors);
hypernetwork strengths ``hypernetwork.<name>``. Blocks that are neither searched nor fixed do not
exist: every block is covered (per block, by a group, by ``fixed``, or by the global value).
Method parameters with no entry in the search space take the method's default in every block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from optimizer.architectures.layout import BlockLayout
from optimizer.architectures.mbw import parse_mbw
from optimizer.merge import MergeRecipe, get_method
from optimizer.merge.recipe import merge_vae_problem
from optimizer.study.config import ParamSpace, StudyConfigError, WarmStart

__all__ = ["BoundSpace", "Dimension", "bind_space", "inert_dimensions", "pin_dimensions", "suggest_recipe", "warm_start_params"]

LORA_PREFIX = "lora."
HYPERNETWORK_PREFIX = "hypernetwork."
#: the one pseudo-block of a hypernetwork's strength
HYPERNETWORK_BLOCK = "ALL"


@dataclass(frozen=True)
class Dimension:
    """One searched value: Optuna name, the merge parameter and the blocks it sets, its range."""

    name: str
    param: str
    blocks: tuple[str, ...]
    low: float
    high: float
    step: float | None
    log: bool


@dataclass(frozen=True)
class BoundSpace:
    """A search space checked against a layout and a method (see :func:`bind_space`)."""

    layout: BlockLayout
    method: str
    n_parents: int
    seed: int
    merge_vae: bool
    dimensions: tuple[Dimension, ...]
    constants: Mapping[str, Mapping[str, float]]  # param -> block -> value (fixed or method default)
    lora_factors: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # LoRA -> touched block -> LBW factor
    hypernetworks: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]


def _bind_param(
    param: str, spec: ParamSpace, *, blocks: tuple[str, ...], where: str, layout_name: str, check
) -> tuple[list[Dimension], dict[str, float] | None]:
    """Dimensions and constants (``{block: value}``, or ``None``) of one searched value over ``blocks``."""
    if spec.value is not None:
        check(spec.value, "value")
        return [], dict.fromkeys(blocks, float(spec.value))
    check(spec.low, "low")
    check(spec.high, "high")
    owner: dict[str, str] = {}
    for group, members in spec.groups.items():
        if group in blocks:
            raise StudyConfigError(f"{where}.groups.{group}: a group may not be named like a block")
        for block in members:
            if block not in blocks:
                raise StudyConfigError(f"{where}.groups.{group}: unknown block {block!r} for {layout_name} ({', '.join(blocks)})")
            if block in owner:
                raise StudyConfigError(f"{where}.groups.{group}: block {block} is already in group {owner[block]}")
            owner[block] = group
    fixed: dict[str, float] = {}
    for name, value in spec.fixed.items():
        check(value, f"fixed.{name}")
        members = spec.groups.get(name, [name] if name in blocks else None)
        if members is None:
            raise StudyConfigError(f"{where}.fixed.{name}: not a block of {layout_name} or a group of this parameter")
        if name in blocks and name in owner:
            raise StudyConfigError(f"{where}.fixed.{name}: block {name} is in group {owner[name]}; fix the group instead")
        for block in members:
            fixed[block] = float(value)
    free = [b for b in blocks if b not in fixed]
    dimensions: list[Dimension] = []
    if spec.share == "global":
        if free:
            dimensions.append(Dimension(param, param, tuple(free), spec.low, spec.high, spec.step, spec.log))
        return dimensions, fixed or None
    emitted: set[str] = set()
    for block in free:
        group = owner.get(block)
        if group is None:
            dimensions.append(Dimension(f"{param}.{block}", param, (block,), spec.low, spec.high, spec.step, spec.log))
        elif group not in emitted:
            emitted.add(group)
            members = tuple(b for b in blocks if owner.get(b) == group)
            dimensions.append(Dimension(f"{param}.{group}", param, members, spec.low, spec.high, spec.step, spec.log))
    return dimensions, fixed or None


def _no_range(value: float, field: str) -> None:
    return None


def bind_space(
    space: Mapping[str, ParamSpace],
    *,
    layout: BlockLayout,
    method: str,
    n_parents: int,
    seed: int = 0,
    merge_vae: bool = False,
    loras: Sequence[tuple[str, ParamSpace, Sequence[str], Mapping[str, float] | None]] = (),
    hypernetworks: Sequence[tuple[str, ParamSpace]] = (),
) -> BoundSpace:
    """Check ``space`` against ``layout`` and ``method``; errors name ``search_space.<param>...``.

    ``loras``: ``(name, strength space, blocks the LoRA touches, LBW factors or None)``; their
    dimensions are ``lora.<name>`` (global), ``lora.<name>.<BLOCK>`` or ``lora.<name>.<GROUP>``.
    ``hypernetworks``: ``(name, strength space)``; dimension ``hypernetwork.<name>``.
    """
    merge_method = get_method(method)
    wanted = merge_method.param_names(n_parents)
    blocks = tuple(layout.blocks)
    problem = merge_vae_problem(layout) if merge_vae else None
    if problem:
        raise StudyConfigError(problem)
    dimensions: list[Dimension] = []
    constants: dict[str, dict[str, float]] = {}
    for param, spec in space.items():
        where = f"search_space.{param}"
        if param not in wanted:
            raise StudyConfigError(f"{where}: {method} with {n_parents} parents has no parameter {param!r}; it takes {', '.join(wanted)}")
        allowed = merge_method.ranges.get(param)

        def check(value: float, field: str, *, _allowed=allowed, _where=where, _param=param) -> None:
            if _allowed is not None and not _allowed.contains(float(value)):
                raise StudyConfigError(f"{_where}.{field}: {_param} must be {_allowed.describe()}, got {value}")

        dims, fixed = _bind_param(param, spec, blocks=blocks, where=where, layout_name=layout.name, check=check)
        dimensions += dims
        if fixed:
            constants[param] = fixed
    for param in wanted:
        if param not in space:
            constants[param] = dict.fromkeys(blocks, float(merge_method.params[param]))
    lora_factors: dict[str, dict[str, float]] = {}
    for i, (name, spec, touched, lbw) in enumerate(loras):
        param = f"{LORA_PREFIX}{name}"
        dims, fixed = _bind_param(param, spec, blocks=tuple(touched), where=f"loras[{i}].strength", layout_name=layout.name, check=_no_range)
        dimensions += dims
        if fixed:
            constants[param] = fixed
        lora_factors[name] = {b: float(lbw[b]) if lbw is not None else 1.0 for b in touched}
    for i, (name, spec) in enumerate(hypernetworks):
        param = f"{HYPERNETWORK_PREFIX}{name}"
        dims, fixed = _bind_param(param, spec, blocks=(HYPERNETWORK_BLOCK,), where=f"hypernetworks[{i}].strength", layout_name=layout.name, check=_no_range)
        dimensions += dims
        if fixed:
            constants[param] = fixed
    return BoundSpace(
        layout=layout, method=method, n_parents=n_parents, seed=seed, merge_vae=merge_vae,
        dimensions=tuple(dimensions), constants={k: dict(v) for k, v in constants.items()},
        lora_factors=lora_factors, hypernetworks=tuple(name for name, _ in hypernetworks),
    )


def inert_dimensions(
    space: BoundSpace, *, equal_blocks: Sequence[str], lora_null_blocks: Mapping[str, Sequence[str]] | None = None
) -> dict[str, str]:
    """``{dimension name: reason}`` for the dimensions that cannot change the weights.

    A merge dimension is inert when every block it sets is equal in all parents (all blocks
    equal: "the parents are identical"; then every
    method gives that block back unchanged: weights summing to one, task vectors of zero, SLERP
    between equal vectors). A LoRA strength is inert when, in every block it sets, the LoRA adds
    nothing (``lora_null_blocks[name]``: blocks whose ``up @ down`` is zero)."""
    equal = set(equal_blocks)
    identical = equal >= set(space.layout.blocks)
    out: dict[str, str] = {}
    for d in space.dimensions:
        if d.name.startswith(HYPERNETWORK_PREFIX) or not d.blocks:
            continue
        if d.name.startswith(LORA_PREFIX):
            name = d.param.removeprefix(LORA_PREFIX)
            null = set((lora_null_blocks or {}).get(name, ()))
            if set(d.blocks) <= null:
                out[d.name] = f"LoRA {name!r} adds nothing to block(s) {', '.join(d.blocks)} (its factors are zero)"
        elif identical:
            out[d.name] = "the parents are identical"
        elif set(d.blocks) <= equal:
            out[d.name] = f"block(s) {', '.join(d.blocks)} are identical in every parent"
    return out


def pin_dimensions(space: BoundSpace, names: Sequence[str]) -> BoundSpace:
    """``space`` with the dimensions ``names`` taken out of the search and held at a constant (the
    method's default where it is in the range, else the low end): for dimensions whose value does
    not matter (:func:`inert_dimensions`), so the sampler spends no trials on them."""
    pinned = set(names)
    if not pinned:
        return space
    defaults = get_method(space.method).params
    constants = {p: dict(v) for p, v in space.constants.items()}
    for d in space.dimensions:
        if d.name in pinned:
            value = defaults.get(d.param, d.low)
            value = value if d.low <= value <= d.high else d.low
            constants.setdefault(d.param, {}).update(dict.fromkeys(d.blocks, float(value)))
    kept = tuple(d for d in space.dimensions if d.name not in pinned)
    return BoundSpace(layout=space.layout, method=space.method, n_parents=space.n_parents, seed=space.seed, merge_vae=space.merge_vae,
                      dimensions=kept, constants=constants, lora_factors=space.lora_factors, hypernetworks=space.hypernetworks)


def suggest_recipe(trial, space: BoundSpace) -> MergeRecipe:
    """The recipe of ``trial`` (any ``optuna.Trial``-like object with ``suggest_float``)."""
    params: dict[str, dict[str, float]] = {p: dict(v) for p, v in space.constants.items()}
    for dim in space.dimensions:
        value = trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)
        target = params.setdefault(dim.param, {})
        for block in dim.blocks:
            target[block] = float(value)
    ordered = {p: {b: params[p][b] for b in space.layout.blocks} for p in get_method(space.method).param_names(space.n_parents)}
    loras = {
        name: {b: params[f"{LORA_PREFIX}{name}"][b] * factor for b, factor in factors.items()}
        for name, factors in space.lora_factors.items()
    }
    hypernetworks = {name: params[f"{HYPERNETWORK_PREFIX}{name}"][HYPERNETWORK_BLOCK] for name in space.hypernetworks}
    return MergeRecipe(
        method=space.method, params=ordered, seed=space.seed, merge_vae=space.merge_vae, loras=loras, hypernetworks=hypernetworks
    )


def _clip(value: float, dim: Dimension, what: str) -> float:
    if not dim.low <= value <= dim.high:
        raise StudyConfigError(f"warm_start {what}: {dim.name} = {value} is outside the searched range [{dim.low}, {dim.high}]")
    return float(value)


def warm_start_params(space: BoundSpace, warm: Sequence[WarmStart]) -> list[dict[str, float]]:
    """Optuna parameter dicts to ``enqueue_trial`` for the study's warm starts, in order."""
    out: list[dict[str, float]] = []
    for i, item in enumerate(warm):
        what = f"[{i}]"
        if item.uniform is not None:
            out.append({d.name: _clip(item.uniform, d, what) for d in space.dimensions})
        elif item.mbw is not None:
            first = space.dimensions[0].param if space.dimensions else None
            if first is None:
                raise StudyConfigError(f"warm_start{what}: nothing is searched")
            try:
                per_block = parse_mbw(item.mbw, layout=space.layout)
            except ValueError as exc:
                raise StudyConfigError(f"warm_start{what}.mbw: {exc}") from None
            params: dict[str, float] = {}
            for d in space.dimensions:
                if d.param != first:
                    continue
                values = {per_block[b] for b in d.blocks}
                if len(values) != 1:
                    raise StudyConfigError(f"warm_start{what}.mbw: blocks {', '.join(d.blocks)} share {d.name} but the MBW string gives them {sorted(values)}")
                params[d.name] = _clip(values.pop(), d, what)
            others = [d.name for d in space.dimensions if d.param != first]
            if others:
                raise StudyConfigError(f"warm_start{what}.mbw: an MBW string sets only {first}; {', '.join(others)} are searched too")
            out.append(params)
        else:
            out.extend(_parent_params(space, what))
    return out


def _parent_params(space: BoundSpace, what: str) -> list[dict[str, float]]:
    """Each parent as it is: for two-parent ``weighted_sum``/``slerp`` alpha 0 (A) and alpha 1 (B)."""
    if space.method not in ("weighted_sum", "slerp") or space.n_parents != 2:
        raise StudyConfigError(f"warm_start{what}: 'parents' needs a two-parent weighted_sum or slerp study")
    if any(d.param != "alpha" for d in space.dimensions):
        raise StudyConfigError(f"warm_start{what}: 'parents' needs alpha to be the only searched parameter")
    return [{d.name: _clip(a, d, what) for d in space.dimensions} for a in (0.0, 1.0)]
