"""The sampler registry: the names a study file's ``sampler.name`` may take, or a plug-in ``module:Class``.

A registered sampler is an Optuna sampler class with the defaults evomerge gives it and whether it
handles several objectives (``mode: pareto``). Adding one is one :func:`register_sampler` call; the
study file, ``evomerge`` and ``tests/test_sampler_contract.py`` (which runs every entry through the
same checks, as Optuna's own sampler test suite does) pick it up.

A plug-in is named ``package.module:ClassName``: any subclass of ``optuna.samplers.BaseSampler``
importable where the study runs. It gets the study file's ``options`` as keyword arguments and the
study's ``seed`` when its constructor takes ``seed``. This module imports no study configuration,
so the configuration can validate names against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna

__all__ = ["SAMPLERS", "SamplerEntry", "plugin_sampler_class", "register_sampler", "sampler_entry"]


@dataclass(frozen=True)
class SamplerEntry:
    """One registered sampler: ``factory()`` returns the Optuna class (imported on use), built with
    ``defaults`` overridden by the study file's options; ``multi_objective``: usable with ``mode: pareto``."""

    name: str
    factory: Callable[[], type[optuna.samplers.BaseSampler]]
    defaults: dict[str, Any] = field(default_factory=dict)
    multi_objective: bool = True
    #: a module the class needs beyond Optuna (checked when the sampler is built) and its PyPI name
    needs: str | None = None
    pip: str | None = None
    summary: str = ""
    #: proposals follow a fixed schedule: the seed changes nothing (the peer strategies)
    deterministic: bool = False


SAMPLERS: dict[str, SamplerEntry] = {}


def register_sampler(entry: SamplerEntry) -> SamplerEntry:
    """Add ``entry`` to :data:`SAMPLERS` (a name registered twice is a programming error)."""
    if entry.name in SAMPLERS or ":" in entry.name:
        raise ValueError(f"sampler {entry.name!r} is already registered or not a plain name")
    SAMPLERS[entry.name] = entry
    return entry


register_sampler(SamplerEntry("tpe", lambda: optuna.samplers.TPESampler, {"multivariate": True}, summary="default; single or multi-objective"))
register_sampler(SamplerEntry("cmaes", lambda: optuna.samplers.CmaEsSampler, multi_objective=False, needs="cmaes",
                              summary="the evolutionary one; single-objective"))
register_sampler(SamplerEntry("nsga2", lambda: optuna.samplers.NSGAIISampler, summary="Pareto fronts (mode: pareto)"))
register_sampler(SamplerEntry("gp", lambda: optuna.samplers.GPSampler, multi_objective=False, summary="small budgets; single-objective"))
register_sampler(SamplerEntry("random", lambda: optuna.samplers.RandomSampler, summary="baseline"))
register_sampler(SamplerEntry("qmc", lambda: optuna.samplers.QMCSampler, {"qmc_type": "sobol", "scramble": True},
                              summary="space-filling baseline (Sobol, scrambled)"))


# the strategies merge users already run (optimizer.study.peer_samplers): baselines to beat
def _peer(name: str):
    def factory():
        from optimizer.study import peer_samplers

        return getattr(peer_samplers, name)

    return factory


register_sampler(SamplerEntry("coordinate", _peer("CoordinateSampler"), multi_objective=False, deterministic=True,
                              summary="auto-MBW: one block at a time over 0..1 in steps of 0.1"))
register_sampler(SamplerEntry("gp-ucb", _peer("GPUCBSampler"), multi_objective=False, needs="bayes_opt", pip="bayesian-optimization",
                              summary="bayesian-merger: bayes_opt GP with UCB over every block"))
register_sampler(SamplerEntry("preset-grid", _peer("PresetGridSampler"), multi_objective=False, deterministic=True,
                              summary="supermerger's MBW presets, one per trial"))
register_sampler(SamplerEntry("uniform-sweep", _peer("UniformSweepSampler"), multi_objective=False, deterministic=True,
                              summary="Checkpoint Merger sweep: one alpha for every block, 0..1"))


def plugin_sampler_class(name: str) -> type[optuna.samplers.BaseSampler]:
    """The class a ``module:Class`` name points at; ``ValueError`` saying what is wrong otherwise."""
    from optimizer.plugins import import_object

    try:
        cls = import_object(name)
    except ValueError as exc:
        raise ValueError(f"sampler {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, optuna.samplers.BaseSampler)):
        raise ValueError(f"{name} is not an Optuna sampler class (a subclass of optuna.samplers.BaseSampler)")
    return cls


def sampler_entry(name: str) -> SamplerEntry:
    """The registered entry of ``name``, or an entry for the plug-in class ``module:Class``."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    if ":" in name:
        cls = plugin_sampler_class(name)
        return SamplerEntry(name, lambda: cls, summary=f"plug-in {cls.__module__}.{cls.__qualname__}")
    raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}, or a plug-in module:Class")
