"""A merge recipe: one method plus per-block parameter values; what an Optuna trial proposes.

``params[name][block]`` is the value of parameter ``name`` in MBW block ``block``; every block of
the layout must be present for every parameter the method takes. Components (the VAE) are not
in ``params``: with ``merge_vae=False`` (default) the VAE is copied from parent 0; with
``merge_vae=True`` it is merged by the same method using the **BASE block's** parameters
(supermerger's convention: keys outside the UNet blocks follow the base alpha).

Adapters: ``loras[name][block]`` is the strength of LoRA ``name`` in MBW block ``block`` (only the
blocks the LoRA touches are needed), added in place after the merge by the kernel;
``hypernetworks[name]`` is a hypernetwork's strength, applied at render time (not by the kernel).

Round trip: ``MergeRecipe.model_validate_json(r.model_dump_json()) == r``, and likewise
:meth:`MergeRecipe.to_yaml` / :meth:`MergeRecipe.from_yaml`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from optimizer.architectures.layout import BlockLayout
from optimizer.architectures.mbw import format_mbw, parse_mbw
from optimizer.merge.errors import MergeMethodError, RecipeError
from optimizer.merge.methods import MergeMethod, get_method

#: Block whose parameters the VAE uses when ``merge_vae`` is true.
VAE_PARAMS_BLOCK = "BASE"


def merge_vae_problem(layout: BlockLayout) -> str | None:
    """Why ``merge_vae`` cannot apply to ``layout`` (its components take the parameters of the
    :data:`VAE_PARAMS_BLOCK` block, which DiT layouts lack), or ``None``."""
    if layout.components and VAE_PARAMS_BLOCK not in layout.blocks:
        return (f"merge_vae: {layout.name} has no {VAE_PARAMS_BLOCK} block, whose parameters the components "
                f"({', '.join(layout.components)}) would be merged with; they are copied from the first parent (leave merge_vae off)")
    return None


class MergeRecipe(BaseModel):
    """Method name, ``params[param][block]``, seed for stochastic methods, VAE handling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    params: dict[str, dict[str, float]] = Field(default_factory=dict)
    seed: int = 0
    merge_vae: bool = False
    loras: dict[str, dict[str, float]] = Field(default_factory=dict)
    hypernetworks: dict[str, float] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        get_method(value)  # raises with the list of known names
        return value

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def uniform(cls, *, method: str, layout: BlockLayout, seed: int = 0, merge_vae: bool = False, **params: float) -> MergeRecipe:
        """Same value in every block. Parameters not given take the method's defaults, except
        per-parent weights beyond the first (``weighted_sum``'s beta, gamma, delta), which are
        included only when given."""
        m = get_method(method)
        values = _with_defaults(m, params)
        return cls(method=method, params={p: dict.fromkeys(layout.blocks, float(v)) for p, v in values.items()}, seed=seed, merge_vae=merge_vae)

    @classmethod
    def from_mbw(
        cls,
        *,
        method: str,
        layout: BlockLayout,
        mbw: str | Sequence[float] | Mapping[str, float],
        param: str = "alpha",
        seed: int = 0,
        merge_vae: bool = False,
        **other_params: float,
    ) -> MergeRecipe:
        """``param`` per block from an MBW string / list / mapping; other parameters uniform
        (defaults as in :meth:`uniform`)."""
        m = get_method(method)
        if param not in m.params:
            raise RecipeError(f"merge method {method!r} has no parameter {param!r}; it takes {', '.join(m.params)}")
        if isinstance(mbw, str):
            per_block = parse_mbw(mbw, layout=layout)
        elif isinstance(mbw, Mapping):
            per_block = {b: float(v) for b, v in mbw.items()}
        else:
            values = [float(v) for v in mbw]
            if len(values) != len(layout.blocks):
                raise RecipeError(f"{layout.name} takes {len(layout.blocks)} MBW values, got {len(values)}")
            per_block = dict(zip(layout.blocks, values, strict=True))
        values = _with_defaults(m, {param: 0.0, **other_params})
        params = {p: dict.fromkeys(layout.blocks, float(v)) for p, v in values.items()}
        params[param] = per_block
        return cls(method=method, params=params, seed=seed, merge_vae=merge_vae)

    # ---------------------------------------------------------------- queries

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    def block_params(self, block: str) -> dict[str, float]:
        """``{param: value}`` for one MBW block."""
        try:
            return {p: per_block[block] for p, per_block in self.params.items()}
        except KeyError:
            raise RecipeError(f"recipe has no value for block {block!r}") from None

    def to_mbw(self, *, layout: BlockLayout, param: str = "alpha") -> str:
        """``param`` as an MBW string in layout order."""
        if param not in self.params:
            raise RecipeError(f"recipe has no parameter {param!r}; it has {', '.join(self.params)}")
        return format_mbw(self.params[param], layout=layout)

    def validate_for(self, layout: BlockLayout, n_parents: int) -> None:
        """Raise :class:`RecipeError` / :class:`MergeMethodError` unless this recipe fits.

        Checks: parent count in the method's range; exactly the parameters the method takes with
        ``n_parents``; each parameter has every block of ``layout`` and no other; every value in
        the parameter's range (messages name the parameter and the block).
        """
        m = get_method(self.method)
        m.check_parents(n_parents)
        problem = merge_vae_problem(layout) if self.merge_vae else None
        if problem:
            raise RecipeError(problem)
        wanted = m.param_names(n_parents)
        missing = [p for p in wanted if p not in self.params]
        if missing:
            raise RecipeError(f"recipe for {self.method!r} with {n_parents} parents lacks parameter(s) {missing}")
        extra = [p for p in self.params if p not in wanted]
        if extra:
            raise RecipeError(f"recipe for {self.method!r} with {n_parents} parents has parameter(s) {extra} it does not take; it takes {list(wanted)}")
        for p in wanted:
            per_block = self.params[p]
            lacking = [b for b in layout.blocks if b not in per_block]
            if lacking:
                raise RecipeError(f"recipe parameter {p!r} has no value for block(s) {lacking} of {layout.name}")
            unknown = [b for b in per_block if b not in layout.blocks]
            if unknown:
                raise RecipeError(f"recipe parameter {p!r} names block(s) {unknown} that {layout.name} does not have")
            for b in layout.blocks:
                m.check_value(p, per_block[b], block=b)
        for name, per_block in self.loras.items():
            unknown = [b for b in per_block if b not in layout.blocks]
            if unknown:
                raise RecipeError(f"recipe LoRA {name!r} names block(s) {unknown} that {layout.name} does not have")

    # ---------------------------------------------------------------- YAML

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MergeRecipe:
        data: Any = yaml.safe_load(text)
        return cls.model_validate(data)


def _with_defaults(method: MergeMethod, given: Mapping[str, float]) -> dict[str, float]:
    unknown = [p for p in given if p not in method.params]
    if unknown:
        raise MergeMethodError(f"merge method {method.name!r} has no parameter(s) {unknown}; it takes {', '.join(method.params)}")
    optional = set(method.per_parent[1:])
    return {p: float(given.get(p, default)) for p, default in method.params.items() if p in given or p not in optional}
