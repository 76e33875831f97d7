"""A sampler a user might plug in (``sampler: {name: "tests.plugin_sampler:CentreFirstSampler"}``):
the centre of every range first, then uniform random draws within ``spread`` of it."""

from __future__ import annotations

import numpy as np
import optuna
from optuna.distributions import FloatDistribution


class CentreFirstSampler(optuna.samplers.BaseSampler):
    def __init__(self, *, spread: float = 0.5, seed: int | None = None) -> None:
        self.spread = spread
        self.rng = np.random.default_rng(seed)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if not isinstance(param_distribution, FloatDistribution):
            return optuna.samplers.RandomSampler(seed=int(self.rng.integers(2**31))).sample_independent(study, trial, param_name, param_distribution)
        low, high = param_distribution.low, param_distribution.high
        centre = (low + high) / 2
        if trial.number == 0:
            return centre
        half = self.spread * (high - low) / 2
        return float(np.clip(centre + self.rng.uniform(-half, half), low, high))
