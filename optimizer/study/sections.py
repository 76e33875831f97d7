"""The sections of a study file: one pydantic model each, validated where it stands.

:class:`optimizer.study.config.StudyConfig` assembles them and checks the rules that span sections
(a technique's own rules, Pareto needing a multi-objective sampler, ...). Every model is
:class:`StrictModel`: an unknown key is an error naming it, and a parsed value is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "PRUNERS",
    "BudgetConfig",
    "CalibrationConfig",
    "CombineConfig",
    "HeartbeatConfig",
    "HypernetworkConfig",
    "LoraConfig",
    "ObjectiveConfig",
    "ParamSpace",
    "PrunerConfig",
    "RecalibrateConfig",
    "RenderConfig",
    "SamplerConfig",
    "ScorerConfig",
    "WarmStart",
    "StrictModel",
    "check_resolvable",
]

PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")


class StrictModel(BaseModel):
    """A study file section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpace(StrictModel):
    """How one merge parameter (``alpha``, ``density``, ...) is searched.

    ``share``: ``per_block`` (one value per block: 26 for SD1.x, 20 for SDXL) or ``global`` (one
    value for every block). ``groups`` ties blocks to one value (``{IN: [IN00, ..., IN11]}``);
    ``fixed`` pins blocks or groups to a value (not searched). ``value`` pins the whole parameter.
    """

    low: float = 0.0
    high: float = 1.0
    step: float | None = Field(default=None, gt=0)
    log: bool = False
    share: Literal["per_block", "global"] = "per_block"
    groups: dict[str, list[str]] = Field(default_factory=dict)
    fixed: dict[str, float] = Field(default_factory=dict)
    value: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpace:
        if self.value is None and not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined (Optuna)")
        if self.share == "global" and self.groups:
            raise ValueError("groups only make sense with share: per_block")
        for name, blocks in self.groups.items():
            if not blocks:
                raise ValueError(f"group {name!r} lists no blocks")
        return self


class WarmStart(StrictModel):
    """A known recipe enqueued before the sampler starts: ``uniform: 0.5``, ``parents: true``
    (each parent as it is), or ``mbw: "0.5,1,...,0"`` (the first searched parameter per block)."""

    uniform: float | None = None
    parents: bool = False
    mbw: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if value == "parents":
            return {"parents": True}
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> WarmStart:
        given = [self.uniform is not None, self.parents, self.mbw is not None]
        if sum(given) != 1:
            raise ValueError("a warm start is exactly one of uniform: VALUE, parents, mbw: STRING")
        return self


def check_resolvable(value: str, *, resolve: Callable[[str], Any], error: type[Exception]) -> str:
    """``value`` if ``resolve(value)`` finds it; the registry's own ``error`` message as the field's ``ValueError`` otherwise."""
    try:
        resolve(value)
    except error as exc:
        raise ValueError(str(exc)) from None
    return value


def _registered(kind: str, registry: Mapping[str, Any]):
    """A ``name`` field validator: the value must be a key of ``registry``."""

    def check(value: str) -> str:
        if value not in registry:
            raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(registry)}")
        return value

    return field_validator("name")(check)


class SamplerConfig(StrictModel):
    """A registered sampler (:mod:`optimizer.study.sampler_registry`) or a plug-in ``module:Class``
    (an Optuna sampler class), its seed and the keyword ``options`` of its constructor."""

    name: str = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from optimizer.study.sampler_registry import sampler_entry

        sampler_entry(value)  # ValueError: unknown name, or a plug-in that does not import / is not a sampler
        return value


class PrunerConfig(StrictModel):
    name: str = "median"
    options: dict[str, Any] = Field(default_factory=dict)

    _known = _registered("pruner", PRUNERS)


class ObjectiveConfig(StrictModel):
    """One objective: a scorer of the registry (``evomerge scorers`` lists them) or a plug-in
    ``module:Class``; its weight in the combined score; its direction (default: the scorer's);
    ``options`` for this objective only (they override the shared ``scorers:`` options)."""

    name: str
    weight: float = 1.0
    direction: Literal["maximize", "minimize"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from objectives.registry import ScorerRegistryError, get_scorer

        return check_resolvable(value, resolve=get_scorer, error=ScorerRegistryError)

    @property
    def scorer(self) -> type:
        from objectives.registry import get_scorer

        return get_scorer(self.name)

    @property
    def resolved_direction(self) -> str:
        from objectives.registry import default_direction

        return self.direction or default_direction(self.scorer)


class ScorerConfig(BaseModel):
    """Options shared by every objective whose scorer declares them (``clip_model``,
    ``reference``, ...); see :mod:`objectives.settings`. Stored canonically: no nulls, no defaults."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CalibrationConfig(StrictModel):
    """The calibration set scored at study start (see :mod:`objectives.calibration`): each parent's
    renders of the first ``prompts`` search prompts, the same renders with shuffled captions, and
    noise and flat images. ``gate``: stop the study when a scorer ranks noise, flat images or
    mismatched captions at or above the real renders (``false``: only report the margins)."""

    gate: bool = True
    prompts: int = Field(default=8, ge=2)
    seed: int = 0  # the noise images


class CombineConfig(StrictModel):
    """How a weighted study turns several objective values into one score (see :mod:`objectives.combine`).

    ``normalise``: ``calibration`` maps each value to ``(v - v_noise) / (v_parents - v_noise)``
    (0 = noise images, 1 = the parents' renders), ``none`` keeps raw values; ``auto`` is
    ``calibration`` when two or more objectives are combined, else ``none``. ``mean``: ``sum``
    (``sum w_i s_i v_i``, s_i = +1/-1 by direction), or sd-optim's ``arithmetic``, ``geometric`` and
    ``quadratic`` weighted means of normalised scores; ``auto``: ``arithmetic`` when normalised, else ``sum``."""

    normalise: Literal["auto", "none", "calibration"] = "auto"
    mean: Literal["auto", "sum", "arithmetic", "geometric", "quadratic"] = "auto"


class RenderConfig(StrictModel):
    batch_size: int | Literal["auto"] = "auto"
    decoder: Literal["vae", "taesd"] = "vae"
    taesd: str | None = None  # folder with taesd_decoder.safetensors (decoder: taesd)
    grid_images: int = Field(default=16, ge=0)  # images of each trial's grid artifact (0: none)

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("batch_size must be positive or 'auto'")
        return value


class BudgetConfig(StrictModel):
    """Stop after ``trials`` finished trials (complete or pruned, counted over resumes) and/or
    ``seconds`` of this run."""

    trials: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> BudgetConfig:
        if self.trials is None and self.seconds is None:
            raise ValueError("give trials and/or seconds")
        return self


def _global_strength() -> ParamSpace:
    return ParamSpace(low=0.0, high=1.0, share="global")


def _strength_defaults_global(value: Any) -> Any:
    """An adapter's ``strength`` mapping without ``share`` means one global strength."""
    if isinstance(value, dict) and isinstance(value.get("strength"), dict) and "share" not in value["strength"]:
        return {**value, "strength": {**value["strength"], "share": "global"}}
    if isinstance(value, dict) and isinstance(value.get("strength"), (int, float)):
        return {**value, "strength": {"value": float(value["strength"]), "share": "global"}}
    return value


class _AdapterConfig(StrictModel):
    """An adapter file, its name (default: the file stem) and how its strength is searched. A
    ``strength`` mapping without ``share`` is global; a plain number pins the strength."""

    path: str
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    strength: ParamSpace = Field(default_factory=_global_strength)

    _defaults = model_validator(mode="before")(classmethod(lambda cls, value: _strength_defaults_global(value)))

    @property
    def resolved_name(self) -> str:
        return self.name or Path(self.path).stem


class LoraConfig(_AdapterConfig):
    """A LoRA added after the merge. ``strength`` is a :class:`ParamSpace` over the blocks the LoRA
    touches (default: one global strength in [0, 1]; ``share: per_block`` for one strength per
    block, ``groups`` to tie blocks, ``value`` to pin it). ``lbw``: an LBW string or preset
    (``OUTALL``) whose per-block values multiply a global strength."""

    lbw: str | None = None

    @model_validator(mode="after")
    def _lbw_global(self) -> LoraConfig:
        if self.lbw is not None and self.strength.value is None and self.strength.share != "global":
            raise ValueError("lbw scales one global strength; set strength.share: global")
        return self


class HypernetworkConfig(_AdapterConfig):
    """A hypernetwork applied at render time (A1111 ``.pt``); its strength is global."""

    @model_validator(mode="after")
    def _global(self) -> HypernetworkConfig:
        if self.strength.value is None and self.strength.share != "global":
            raise ValueError("a hypernetwork has one strength: set strength.share: global")
        return self


class RecalibrateConfig(StrictModel):
    """AdaBN/REPAIR-style recalibration of the merged UNet's GroupNorm/LayerNorm affine parameters
    after each merge, towards the parents' activation statistics interpolated with the recipe's
    per-block alphas (``weighted_sum`` only). The calibration batch: the first ``prompts`` search
    prompts at each of ``timesteps``, seeded Gaussian latents."""

    prompts: int = Field(default=4, ge=1)
    timesteps: list[int] = Field(default_factory=lambda: [999, 750, 500, 250], min_length=1)
    seed: int = 0


class HeartbeatConfig(StrictModel):
    """Optuna heartbeat: a trial whose process stops beating for ``grace`` seconds is failed and retried."""

    interval: int = Field(default=10, ge=1)
    grace: int = Field(default=30, ge=2)
    max_retry: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _grace_outlasts_a_beat(self) -> "HeartbeatConfig":
        if self.grace <= self.interval:
            raise ValueError(f"grace ({self.grace} s) must be longer than interval ({self.interval} s), "
                             "or live trials would be failed between two beats")
        return self
