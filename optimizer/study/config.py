"""The study file: YAML validated with pydantic; every error names the field.

A study file names the parents, the merge method, the search space over per-block parameters, the
sampler, the objectives, the prompt set, the budget and the storage (see ``studies/*.yaml`` and
the README). Relative paths are relative to the study file (:mod:`optimizer.study.config_paths`).
Each section is a model of :mod:`optimizer.study.sections` (re-exported here); :class:`StudyConfig`
checks the rules that span sections. The parsed config is plain data: nothing heavy is built here
(see :mod:`optimizer.study.runner`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from optimizer.config_errors import describe_validation_error, read_yaml_file
from optimizer.errors import EvomergeError
from optimizer.study.config_paths import resolve_study_paths
from optimizer.study.sections import (
    BudgetConfig,
    CalibrationConfig,
    CombineConfig,
    HeartbeatConfig,
    HypernetworkConfig,
    LoraConfig,
    ObjectiveConfig,
    ParamSpace,
    PrunerConfig,
    RecalibrateConfig,
    RenderConfig,
    SamplerConfig,
    ScorerConfig,
    StrictModel,
    WarmStart,
    check_resolvable,
)

__all__ = [
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
    "StudyConfig",
    "StudyConfigError",
    "WarmStart",
    "load_study_config",
    "parse_study_config",
]


class StudyConfigError(EvomergeError, ValueError):
    """A study file is missing, not YAML, or invalid (the message names the field)."""


class StudyConfig(StrictModel):
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

        return check_resolvable(value, resolve=technique_class, error=TechniqueError)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        from optimizer.merge import get_method
        from optimizer.merge.errors import MergeMethodError

        return check_resolvable(value, resolve=get_method, error=MergeMethodError)

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


def parse_study_config(data: Any, *, source: str = "study", base: str | os.PathLike[str] | None = None) -> StudyConfig:
    """Validate parsed YAML as a :class:`StudyConfig` (paths made absolute against ``base``)."""
    if not isinstance(data, dict):
        raise StudyConfigError(f"{source}: expected a mapping (name, parents, search_space, objectives, prompts, budget, ...)")
    if base is not None:
        data = resolve_study_paths(data, Path(base))
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise StudyConfigError(f"{source}: {describe_validation_error(exc)}") from None


def load_study_config(path: str | os.PathLike[str]) -> StudyConfig:
    """Read and validate a study file."""
    data = read_yaml_file(path, error=StudyConfigError, missing="no study file")
    return parse_study_config(data, source=str(path), base=Path(path).resolve().parent)
