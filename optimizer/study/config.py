"""The study file: YAML validated with pydantic; every error names the field.

A study file names the parents, the merge method, the search space over per-block parameters, the
sampler, the objectives, the prompt set, the budget and the storage (see ``studies/*.yaml`` and
the README). Relative paths are relative to the study file. The parsed :class:`StudyConfig` is
plain data: nothing heavy is built here (see :mod:`optimizer.study.runner`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from optimizer.config_errors import describe_validation_error, read_yaml_file
from optimizer.errors import EvomergeError

__all__ = [
    "BudgetConfig",
    "CalibrationConfig",
    "CombineConfig",
    "HypernetworkConfig",
    "LoraConfig",
    "ObjectiveConfig",
    "ParamSpace",
    "PrunerConfig",
    "RecalibrateConfig",
    "RenderConfig",
    "SamplerConfig",
    "ScorerConfig",
    "StudyConfig",
    "StudyConfigError",
    "WarmStart",
    "load_study_config",
    "parse_study_config",
]

PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")


class StudyConfigError(EvomergeError, ValueError):
    """A study file is missing, not YAML, or invalid (the message names the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamSpace(_Strict):
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


class WarmStart(_Strict):
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


def _resolvable(value: str, *, resolve: Callable[[str], Any], error: type[Exception]) -> str:
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


class SamplerConfig(_Strict):
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


class PrunerConfig(_Strict):
    name: str = "median"
    options: dict[str, Any] = Field(default_factory=dict)

    _known = _registered("pruner", PRUNERS)


class ObjectiveConfig(_Strict):
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

        return _resolvable(value, resolve=get_scorer, error=ScorerRegistryError)

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


class CalibrationConfig(_Strict):
    """The calibration set scored at study start (see :mod:`objectives.calibration`): each parent's
    renders of the first ``prompts`` search prompts, the same renders with shuffled captions, and
    noise and flat images. ``gate``: stop the study when a scorer ranks noise, flat images or
    mismatched captions at or above the real renders (``false``: only report the margins)."""

    gate: bool = True
    prompts: int = Field(default=8, ge=2)
    seed: int = 0  # the noise images


class CombineConfig(_Strict):
    """How a weighted study turns several objective values into one score (see :mod:`objectives.combine`).

    ``normalise``: ``calibration`` maps each value to ``(v - v_noise) / (v_parents - v_noise)``
    (0 = noise images, 1 = the parents' renders), ``none`` keeps raw values; ``auto`` is
    ``calibration`` when two or more objectives are combined, else ``none``. ``mean``: ``sum``
    (``sum w_i s_i v_i``, s_i = +1/-1 by direction), or sd-optim's ``arithmetic``, ``geometric`` and
    ``quadratic`` weighted means of normalised scores; ``auto``: ``arithmetic`` when normalised, else ``sum``."""

    normalise: Literal["auto", "none", "calibration"] = "auto"
    mean: Literal["auto", "sum", "arithmetic", "geometric", "quadratic"] = "auto"


class RenderConfig(_Strict):
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


class BudgetConfig(_Strict):
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


class _AdapterConfig(_Strict):
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


class RecalibrateConfig(_Strict):
    """AdaBN/REPAIR-style recalibration of the merged UNet's GroupNorm/LayerNorm affine parameters
    after each merge, towards the parents' activation statistics interpolated with the recipe's
    per-block alphas (``weighted_sum`` only). The calibration batch: the first ``prompts`` search
    prompts at each of ``timesteps``, seeded Gaussian latents."""

    prompts: int = Field(default=4, ge=1)
    timesteps: list[int] = Field(default_factory=lambda: [999, 750, 500, 250], min_length=1)
    seed: int = 0


class HeartbeatConfig(_Strict):
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


class StudyConfig(_Strict):
    """A whole study (see the module docstring)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    parents: list[str] = Field(min_length=2)
    architecture: str = "auto"  # "auto" or an architecture record's name (sd1, sd2, sdxl, sd3, sd35_large, flux)
    method: str = "weighted_sum"
    merge_vae: bool = False
    seed: int = 0  # stochastic merge methods (DARE)
    #: the dtype parents are merged and rendered in, and exports written in. Unset: the parents' own on a
    #: GPU; on CPU fp32 (fp16 kernels are slow there) with exports written in the parents' dtype
    dtype: Literal["fp16", "bf16", "fp32"] | None = None
    device: str = "auto"
    #: where the parents live: on the device, or in host memory streamed per merge (big parents: Flux)
    placement: Literal["device", "host"] = "device"
    allow_nonfinite: bool = False  # merge parents holding NaN/Inf values (refused by default, naming the keys)
    config_dir: str | None = None  # diffusers config folder for rendering (default: found or shipped)
    search_space: dict[str, ParamSpace] = Field(default_factory=dict)
    technique: str = "merge"  # a registered technique (optimizer.study.techniques): merge, output_ensemble
    loras: list[LoraConfig] = Field(default_factory=list)
    hypernetworks: list[HypernetworkConfig] = Field(default_factory=list)
    recalibrate: RecalibrateConfig | None = None
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    pruner: PrunerConfig = Field(default_factory=PrunerConfig)
    warm_start: list[WarmStart] = Field(default_factory=list)
    objectives: list[ObjectiveConfig] = Field(min_length=1)
    mode: Literal["weighted", "pareto"] = "weighted"
    scorers: ScorerConfig = Field(default_factory=ScorerConfig)
    combine: CombineConfig = Field(default_factory=CombineConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    prompts: str
    render: RenderConfig = Field(default_factory=RenderConfig)
    budget: BudgetConfig
    storage: str | None = None  # Optuna RDB URL; default sqlite:///<study folder>/study.db
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        from optimizer.architectures.layout import available_layouts

        known = available_layouts()
        if value != "auto" and value not in known:
            raise ValueError(f"unknown architecture {value!r}; use auto or one of {', '.join(known)}")
        return value

    @field_validator("technique")
    @classmethod
    def _known_technique(cls, value: str) -> str:
        from optimizer.study.techniques import TechniqueError, technique_class

        return _resolvable(value, resolve=technique_class, error=TechniqueError)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from optimizer.merge import get_method
        from optimizer.merge.errors import MergeMethodError

        return _resolvable(value, resolve=get_method, error=MergeMethodError)

    @model_validator(mode="after")
    def _consistent(self) -> StudyConfig:
        adapters = [a.resolved_name for a in self.loras] + [h.resolved_name for h in self.hypernetworks]
        if len(set(adapters)) != len(adapters):
            raise ValueError(f"loras/hypernetworks: names must be unique, got {adapters} (set name:)")
        if not self.search_space and not any(a.strength.value is None for a in [*self.loras, *self.hypernetworks]):
            raise ValueError("search_space: nothing is searched (no merge parameter, no LoRA or hypernetwork strength)")
        from optimizer.study.techniques import technique_class

        technique_class(self.technique).check_config(self)  # each technique's own rules
        names = [o.scorer.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each objective once, got {names}")
        from objectives.registry import scorers
        from objectives.settings import unknown_shared

        unknown = unknown_shared(self.scorers.as_dict(), [*scorers().values(), *(o.scorer for o in self.objectives)])
        if unknown:
            raise ValueError(f"scorers.{unknown[0]}: no scorer takes an option {unknown[0]!r} (`evomerge scorers` lists each scorer's options)")
        self.objective_specs  # noqa: B018 - validates every objective's settings
        mean = self.combined_mean
        if mean in ("geometric", "quadratic") and self.normalisation != "calibration":
            raise ValueError(f"combine.mean: {mean} means need normalised scores (combine.normalise: calibration)")
        if mean != "sum" and any(o.weight <= 0 for o in self.objectives):
            raise ValueError(f"combine.mean: {mean} means need positive weights (a minimized objective is already flipped by its direction)")
        if self.mode == "pareto":
            if len(self.objectives) < 2:
                raise ValueError("mode: pareto needs at least two objectives")
            if self.pruner.name != "none":
                raise ValueError("pruner: Optuna cannot prune multi-objective trials; set pruner: {name: none} with mode: pareto")
            from optimizer.study.sampler_registry import SAMPLERS, sampler_entry

            if not sampler_entry(self.sampler.name).multi_objective:
                usable = ", ".join(n for n, e in SAMPLERS.items() if e.multi_objective)
                raise ValueError(f"sampler: {self.sampler.name} is single-objective; use {usable} with mode: pareto")
        elif self.sampler.name == "nsga2" and len(self.objectives) == 1:
            pass  # NSGA-II works for one objective too
        if self.render.decoder == "taesd" and self.render.taesd is None:
            raise ValueError("render.taesd: decoder taesd needs the folder of taesd_decoder.safetensors")
        return self

    @model_validator(mode="before")
    @classmethod
    def _canonical_scorers(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("scorers"), dict):
            from objectives.registry import ScorerRegistryError, scorers
            from objectives.settings import canonical_shared

            try:
                known = scorers()
            except ScorerRegistryError as exc:
                raise ValueError(str(exc)) from None
            data = {**data, "scorers": canonical_shared(data["scorers"], known.values())}
        return data

    @property
    def objective_specs(self) -> list:
        """Each objective as an :class:`objectives.build.ObjectiveSpec` (scorer, validated settings, direction)."""
        from objectives.build import objective_spec

        shared = self.scorers.as_dict()
        return [objective_spec(o.name, shared=shared, options=o.options, direction=o.direction, where=f"objectives[{i}] ({o.name})")
                for i, o in enumerate(self.objectives)]

    @property
    def normalisation(self) -> str:
        """``none`` or ``calibration`` (``auto`` resolved: normalise when a weighted study combines several objectives)."""
        if self.combine.normalise != "auto":
            return self.combine.normalise
        return "calibration" if self.mode == "weighted" and len(self.objectives) > 1 else "none"

    @property
    def combined_mean(self) -> str:
        if self.combine.mean != "auto":
            return self.combine.mean
        return "arithmetic" if self.normalisation == "calibration" else "sum"

    @property
    def directions(self) -> list[str]:
        """Optuna directions: one ``maximize`` for the weighted score, else each objective's."""
        if self.mode == "weighted":
            return ["maximize"]
        return [o.resolved_direction for o in self.objectives]


_PATH_FIELDS = (("config_dir",), ("prompts",), ("render", "taesd"))


def _resolve(value: str, base: Path) -> str:
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths of the study file made absolute (relative to the file's folder)."""
    data = dict(data)
    if isinstance(data.get("parents"), list):
        data["parents"] = [_resolve(p, base) if isinstance(p, str) else p for p in data["parents"]]
    for field in ("loras", "hypernetworks"):
        if isinstance(data.get(field), list):
            data[field] = [
                {**item, "path": _resolve(item["path"], base)} if isinstance(item, dict) and isinstance(item.get("path"), str) else item
                for item in data[field]
            ]
    _resolve_scorer_paths(data, base)
    for path in _PATH_FIELDS:
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            if len(path) > 1:  # copy the nested mapping before writing into it
                parent = dict(node)
                parent[path[-1]] = _resolve(node[path[-1]], base)
                data[path[0]] = parent
            else:
                data[path[0]] = _resolve(node[path[0]], base)
    return data


def _resolve_scorer_paths(data: dict[str, Any], base: Path) -> None:
    """The path options of ``scorers:`` and of each objective's ``options:`` made absolute (in place)."""
    from objectives.registry import ScorerRegistryError, get_scorer, scorers
    from objectives.settings import path_options, resolve_paths

    try:
        known = list(scorers().values())
    except ScorerRegistryError:
        return  # reported by validation
    objectives = data.get("objectives")
    named: list[type | None] = []
    if isinstance(objectives, list):
        for item in objectives:
            name = item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None
            try:
                named.append(get_scorer(name) if isinstance(name, str) else None)
            except ScorerRegistryError:
                named.append(None)
        data["objectives"] = [
            {**item, "options": resolve_paths(scorer.Settings, item["options"], base=base)}
            if scorer is not None and isinstance(item, dict) and isinstance(item.get("options"), dict) else item
            for item, scorer in zip(objectives, named, strict=True)
        ]
    if isinstance(data.get("scorers"), dict):
        shared = dict(data["scorers"])
        for scorer in {*known, *(n for n in named if n is not None)}:
            resolved = resolve_paths(scorer.Settings, {k: v for k, v in shared.items() if k in path_options(scorer.Settings)}, base=base)
            shared.update(resolved)
        data["scorers"] = shared


def parse_study_config(data: Any, *, source: str = "study", base: str | os.PathLike[str] | None = None) -> StudyConfig:
    """Validate parsed YAML as a :class:`StudyConfig` (paths made absolute against ``base``)."""
    if not isinstance(data, dict):
        raise StudyConfigError(f"{source}: expected a mapping (name, parents, search_space, objectives, prompts, budget, ...)")
    if base is not None:
        data = _resolve_paths(data, Path(base))
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise StudyConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_study_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study file."""
    data = read_yaml_file(path, error=StudyConfigError, missing="no study file")
    return parse_study_config(data, source=str(path), base=Path(path).resolve().parent)
