"""The search strategies merge users already run, as Optuna samplers: the baselines evomerge must beat.

=============== ============================================================================
name            what it does (and whose strategy it is)
=============== ============================================================================
coordinate      auto-MBW's coordinate search: start every dimension at ``start`` (fraction
                of its range), then sweep one dimension at a time over ``steps`` evenly
                spaced values (11: 0, 0.1, ..., 1), the others held at the best trial's
                values; after the last dimension it starts another pass.
gp-ucb          bayesian-merger's Gaussian process with the upper confidence bound
                (``kappa`` 2.576) over every dimension, by the library bayesian-merger uses
                (``bayes_opt``, package ``bayesian-optimization``): ``init_points`` random
                trials, then each trial is ``BayesianOptimization.suggest()`` given every
                completed trial.
preset-grid     supermerger's MBW presets (:data:`PRESETS_FILE`) tried one per trial, in the
                file's order (a budget beyond the grid tries them again).
uniform-sweep   the Checkpoint Merger sweep: every dimension the same fraction of its range,
                ``steps`` values from 0 to 1, one per trial.
=============== ============================================================================

Each is stateless between trials: a proposal is a function of the trial's number and the study's
completed trials, so a resumed study or a second worker continues the same schedule. A sampler
that takes ``space`` gets the study's bound search space (:class:`optimizer.study.space.BoundSpace`,
passed by :func:`optimizer.study.samplers.make_sampler`): its dimensions in block order and the
blocks each one covers. In a plain Optuna study (no ``space``) dimensions are taken in name order
and each covers every block. All four are single-objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "PRESETS_FILE",
    "CoordinateSampler",
    "GPUCBSampler",
    "PresetGridSampler",
    "UniformSweepSampler",
    "preset_block_values",
    "snap",
    "supermerger_presets",
    "value_at",
]

#: supermerger's MBW presets, transcribed from its ``scripts/mbwpresets.txt`` (26 SD1 values each)
PRESETS_FILE = Path(__file__).resolve().parent / "presets" / "supermerger_mbw.yaml"


def value_at(distribution: BaseDistribution, fraction: float) -> Any:
    """The value ``fraction`` (0..1) of the way through ``distribution``'s range: linear, or
    geometric on a log scale; snapped to its step; a categorical's choice at that position."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        return choices[min(int(fraction * len(choices)), len(choices) - 1)]
    low, high = distribution.low, distribution.high
    if distribution.log:
        return snap(distribution, math.exp(math.log(low) + fraction * (math.log(high) - math.log(low))))
    return snap(distribution, low + fraction * (high - low))


def snap(distribution: FloatDistribution | IntDistribution, value: float) -> Any:
    """``value`` clipped into ``distribution``'s range and snapped to its step."""
    low, high = distribution.low, distribution.high
    step = distribution.step
    if step:
        value = low + round((value - low) / step) * step
    value = min(max(value, low), high)
    return int(round(value)) if isinstance(distribution, IntDistribution) else float(value)


def _inside(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    return distribution.low <= value <= distribution.high


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _best(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial (single objective), or None."""
    trials = _complete(study)
    if not trials:
        return None
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
    return max(trials, key=lambda t: sign * t.value)


class _Scheduled(optuna.samplers.BaseSampler):
    """A sampler whose every value is chosen by :meth:`propose` (one parameter at a time)."""

    def __init__(self, *, space: Any = None) -> None:
        self.space = space

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def _names(self, study: optuna.Study, trial: FrozenTrial, name: str) -> list[str]:
        """The dimensions in schedule order: the space's, or the names earlier trials drew (sorted)."""
        if self.space is not None:
            return [d.name for d in self.space.dimensions]
        names = {n for t in study.get_trials(deepcopy=False) if t.number < trial.number for n in t.distributions}
        return sorted(names | {name})

    def _check(self, study: optuna.Study) -> None:
        if len(study.directions) > 1:
            raise ValueError(f"{type(self).__name__} is single-objective")


class CoordinateSampler(_Scheduled):
    """auto-MBW's coordinate search (see the module docstring).

    Trial 0 is the start point. Trial ``t >= 1``, with ``k = t - 1``, ``G = steps`` and ``D``
    dimensions, sweeps dimension ``(k // G) mod D`` to value ``k mod G`` of ``G`` evenly spaced
    ones; every other dimension takes the best complete trial's value (the start before any)."""

    def __init__(self, *, steps: int = 11, start: float = 0.5, space: Any = None) -> None:
        if steps < 2 or not 0.0 <= start <= 1.0:
            raise ValueError("coordinate: steps must be at least 2 and start a fraction in [0, 1]")
        super().__init__(space=space)
        self.steps, self.start = int(steps), float(start)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        self._check(study)
        if trial.number == 0:
            return value_at(param_distribution, self.start)
        names = self._names(study, trial, param_name)
        k = trial.number - 1
        swept = names[(k // self.steps) % len(names)]
        if param_name == swept:
            return value_at(param_distribution, (k % self.steps) / (self.steps - 1))
        best = _best(study)
        if best is not None and param_name in best.params and _inside(param_distribution, best.params[param_name]):
            return best.params[param_name]
        return value_at(param_distribution, self.start)


class UniformSweepSampler(_Scheduled):
    """The Checkpoint Merger sweep: trial ``t`` sets every dimension to fraction ``(t mod steps) / (steps - 1)``."""

    def __init__(self, *, steps: int = 11, space: Any = None) -> None:
        if steps < 2:
            raise ValueError("uniform-sweep: steps must be at least 2")
        super().__init__(space=space)
        self.steps = int(steps)

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        self._check(study)
        return value_at(param_distribution, (trial.number % self.steps) / (self.steps - 1))


# ---------------------------------------------------------------------------------------------- presets
@cache
def supermerger_presets() -> dict[str, tuple[float, ...]]:
    """supermerger's presets as ``{name: 26 values}`` (BASE, IN00..IN11, M00, OUT00..OUT11), in
    the file's order; validated: unique names, 26 values each in [0, 1]."""
    import yaml

    data = yaml.safe_load(PRESETS_FILE.read_text(encoding="utf-8"))
    presets: dict[str, tuple[float, ...]] = {}
    for name, text in data["presets"].items():
        values = tuple(float(v) for v in str(text).split(","))
        if len(values) != 26 or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"{PRESETS_FILE.name}: preset {name} must be 26 values in [0, 1]")
        presets[name] = values
    return presets


def preset_block_values(name: str, *, layout: Any) -> dict[str, float]:
    """Preset ``name`` as ``{block: value}`` for ``layout``: the 26 values as they are for a
    26-block SD1-style layout; for SDXL (20 blocks) supermerger's mapping of its 25 UNet values
    ``w[:9] + w[12:22]`` (IN00..IN08, M00, OUT00..OUT08) after BASE."""
    values = supermerger_presets()[name]
    blocks = list(layout.blocks)
    if len(blocks) == 26:
        return dict(zip(blocks, values, strict=True))
    if layout.name == "sdxl":
        unet = values[1:]
        return dict(zip(blocks, (values[0], *unet[:9], *unet[12:22]), strict=True))
    raise ValueError(f"supermerger's presets are defined for 26-block SD1/SD2 and SDXL layouts, not {layout.name}")


class PresetGridSampler(_Scheduled):
    """supermerger's presets as a grid: trial ``t`` is preset ``t mod P`` of ``presets`` (default:
    all, in the file's order). A dimension of the space's first merge parameter takes the mean of
    the preset over the blocks it covers, as a fraction of its range; any other dimension (a
    second merge parameter, a LoRA strength) takes its range's midpoint. Without a space each
    dimension covers every block."""

    def __init__(self, *, presets: Sequence[str] | None = None, space: Any = None) -> None:
        known = supermerger_presets()
        chosen = list(known) if presets is None else list(presets)
        unknown = [p for p in chosen if p not in known]
        if unknown or not chosen:
            raise ValueError(f"preset-grid: unknown preset(s) {unknown}; known: {', '.join(known)}")
        super().__init__(space=space)
        self.presets = chosen
        self._blocks_of = {p: preset_block_values(p, layout=space.layout) for p in chosen} if space is not None else None
        self._dimensions = {d.name: d for d in space.dimensions} if space is not None else {}
        self._param = space.dimensions[0].param if space is not None and space.dimensions else None

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        self._check(study)
        preset = self.presets[trial.number % len(self.presets)]
        if self._blocks_of is None:
            values = supermerger_presets()[preset]
            return value_at(param_distribution, sum(values) / len(values))
        dimension = self._dimensions.get(param_name)
        if dimension is None or dimension.param != self._param:
            return value_at(param_distribution, 0.5)
        per_block = self._blocks_of[preset]
        covered = [per_block[b] for b in dimension.blocks if b in per_block]
        return value_at(param_distribution, sum(covered) / len(covered) if covered else 0.5)


# ---------------------------------------------------------------------------------------------- GP-UCB
class GPUCBSampler(optuna.samplers.BaseSampler):
    """bayesian-merger's Bayesian optimisation: ``bayes_opt.BayesianOptimization`` with
    ``UpperConfidenceBound(kappa)`` (its default acquisition) over every float dimension.

    The first ``init_points`` trials are uniform random (seeded with ``seed``); then each trial
    builds the optimiser afresh from every complete trial (``register(params, target)``, the value
    negated for a minimised study) and takes ``suggest()``, seeded with ``seed + trial number``, so
    proposals are reproducible and a resumed study continues where it stopped."""

    def __init__(self, *, init_points: int = 10, kappa: float = 2.576, seed: int | None = None) -> None:
        try:
            import bayes_opt  # noqa: F401 - checked here so the study file's error names the package
        except ImportError:
            raise ImportError("gp-ucb needs bayes_opt: pip install bayesian-optimization") from None
        if init_points < 1 or kappa < 0:
            raise ValueError("gp-ucb: init_points must be at least 1 and kappa not negative")
        self.init_points, self.kappa, self.seed = int(init_points), float(kappa), seed
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._space = optuna.search_space.IntersectionSearchSpace()

    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        space = self._space.calculate(study)
        return {n: d for n, d in space.items() if isinstance(d, FloatDistribution | IntDistribution) and d.low < d.high}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        if len(study.directions) > 1:
            raise ValueError("GPUCBSampler is single-objective")
        complete = [t for t in _complete(study) if all(n in t.params for n in search_space)]
        if not search_space or len(complete) < self.init_points:
            return {}
        from bayes_opt import BayesianOptimization
        from bayes_opt.acquisition import UpperConfidenceBound

        state = None if self.seed is None else (self.seed + trial.number) % 2**32
        names = sorted(search_space)
        optimizer = BayesianOptimization(
            f=None, pbounds={n: (float(search_space[n].low), float(search_space[n].high)) for n in names},
            acquisition_function=UpperConfidenceBound(kappa=self.kappa, random_state=state),
            random_state=state, verbose=0, allow_duplicate_points=True,
        )
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        for t in complete:
            optimizer.register(params={n: float(t.params[n]) for n in names}, target=sign * float(t.value))
        suggestion = optimizer.suggest()
        return {n: snap(search_space[n], float(suggestion[n])) for n in names}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)
