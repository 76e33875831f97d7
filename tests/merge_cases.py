"""How the registry-iterating merge tests pick a parent count and parameter values for any method."""

from __future__ import annotations

import random

from optimizer.merge import MergeMethod, get_method


def parents_for(method: MergeMethod | str) -> int:
    """The parent count a test uses: 3 where the method takes it, else the nearest it takes."""
    m = get_method(method) if isinstance(method, str) else method
    return max(m.min_parents, min(3, m.max_parents))


def sample_value(method: MergeMethod, param: str, rng: random.Random) -> float:
    """A value inside the parameter's range, drawn from its part of [0, 1] (open ends kept clear)."""
    allowed = method.ranges.get(param)
    low = 0.0 if allowed is None else max(allowed.low, 0.0)
    high = 1.0 if allowed is None else min(allowed.high, 1.0)
    if allowed is not None and allowed.low_open:
        low += 0.05 * (high - low)
    if allowed is not None and allowed.high_open:
        high -= 0.1 * (high - low)
    return rng.uniform(low, high)


def sample_params(method: MergeMethod | str, n: int, *, seed: int) -> dict[str, float]:
    """One in-range value per parameter the method takes with ``n`` parents."""
    m = get_method(method) if isinstance(method, str) else method
    rng = random.Random(seed)
    return {p: sample_value(m, p, rng) for p in m.param_names(n)}
