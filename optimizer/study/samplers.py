"""Samplers and pruners by name (a study file's ``sampler`` / ``pruner``), built with Optuna.

Samplers come from the registry (:mod:`optimizer.study.sampler_registry`), or are a plug-in
``module:Class`` (any ``optuna.samplers.BaseSampler`` subclass); the registered ones:

========== ============================================ ===================================
name       Optuna class                                 use
========== ============================================ ===================================
tpe        ``TPESampler(multivariate=True)``            default; single or multi-objective
cmaes      ``CmaEsSampler`` (needs ``cmaes``)           the evolutionary one; single-objective
nsga2      ``NSGAIISampler``                            Pareto fronts (mode: pareto)
gp         ``GPSampler``                                small budgets; single-objective
random     ``RandomSampler``                            baseline
qmc        ``QMCSampler`` (Sobol, scrambled)            space-filling baseline
========== ============================================ ===================================

The peers' strategies (:mod:`optimizer.study.peer_samplers`), single-objective baselines:
``coordinate`` (auto-MBW), ``gp-ucb`` (bayesian-merger; needs ``bayesian-optimization``),
``preset-grid`` (supermerger's MBW presets) and ``uniform-sweep`` (the Checkpoint Merger sweep).

``options`` are passed to the class as keyword arguments (e.g. ``n_startup_trials``,
``population_size``; a plug-in gets the study's seed when its constructor takes ``seed``); an
unknown option is an error naming it. Pruners: ``none``, ``median``,
``percentile``, ``successive_halving``, ``hyperband``; they act on the running objective value a
trial reports after each rendered batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import optuna

from optimizer.study.config import PrunerConfig, SamplerConfig, StudyConfigError

__all__ = ["make_pruner", "make_sampler", "process_seed"]


def _build(cls, options: dict[str, Any], defaults: dict[str, Any], where: str):
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise StudyConfigError(f"{where}.options: {cls.__name__} has no option(s) {unknown}; it takes {sorted(accepted)}")
    try:
        return cls(**{**defaults, **options})
    except (TypeError, ValueError, ImportError, ModuleNotFoundError) as exc:
        raise StudyConfigError(f"{where}: cannot build {cls.__name__}: {exc}") from None


def process_seed(config: SamplerConfig, *, trials_so_far: int, salt: int = 0) -> int | None:
    """The seed one process's sampler uses: ``config.seed`` for a new study; for a resumed or
    shared one, mixed with the number of trials already in the study and a per-worker ``salt``, so
    a resumed run or a second worker does not replay the first process's random sequence (which
    would propose the same start-up parameters again). ``None`` stays unseeded."""
    if config.seed is None:
        return None
    if trials_so_far == 0 and salt == 0:
        return config.seed
    return (config.seed * 1_000_003 + trials_so_far * 7_919 + salt) % 2**32


def make_sampler(config: SamplerConfig, *, seed: int | None | str = "config", space: Any = None) -> optuna.samplers.BaseSampler:
    """The sampler ``config`` names (registered or plug-in ``module:Class``), with its defaults and
    options, seeded with ``config.seed`` (or ``seed`` when given) where its constructor takes a seed,
    and given the study's bound search space ``space`` (:class:`optimizer.study.space.BoundSpace`)
    where it takes ``space`` (the peer strategies of :mod:`optimizer.study.peer_samplers` do)."""
    from optimizer.study.sampler_registry import sampler_entry

    try:
        entry = sampler_entry(config.name)
    except ValueError as exc:
        raise StudyConfigError(f"sampler.name: {exc}") from None
    if entry.needs is not None:
        try:
            __import__(entry.needs)
        except ImportError:
            raise StudyConfigError(f"sampler: {entry.name} needs the `{entry.needs}` package (pip install {entry.pip or entry.needs})") from None
    cls = entry.factory()
    defaults = dict(entry.defaults)
    accepted = inspect.signature(cls.__init__).parameters
    if "seed" in accepted:
        defaults["seed"] = config.seed if seed == "config" else seed
    if "space" in accepted:
        if "space" in config.options:
            raise StudyConfigError("sampler.options.space: the search space is the study's (search_space:), not an option")
        defaults["space"] = space
    return _build(cls, dict(config.options), defaults, "sampler")


def make_pruner(config: PrunerConfig) -> optuna.pruners.BasePruner:
    """The pruner named by ``config``."""
    table = {
        "none": (optuna.pruners.NopPruner, {}),
        "median": (optuna.pruners.MedianPruner, {"n_startup_trials": 5, "n_warmup_steps": 1}),
        "percentile": (optuna.pruners.PercentilePruner, {"percentile": 25.0, "n_startup_trials": 5, "n_warmup_steps": 1}),
        "successive_halving": (optuna.pruners.SuccessiveHalvingPruner, {}),
        "hyperband": (optuna.pruners.HyperbandPruner, {}),
    }
    cls, defaults = table[config.name]
    return _build(cls, dict(config.options), defaults, "pruner")
