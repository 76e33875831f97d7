"""The contract every registered merge method keeps, checked by iterating the registry (as optuna's
``SamplerTestCase`` does for samplers): a new method gets these checks without editing a test.

Per method: a docstring stating the formula and a ``Source:``; parameters in their declared ranges;
the result written into ``out`` (also a view of a larger buffer), parents untouched, dtype kept;
deterministic for a given generator and independent of it unless stochastic; identical parents give
that tensor back; a linear method equals its declared coefficients; an elementwise method gives the
same on a concatenation as on the parts; fp16 inputs match the fp32 computation; the kernel equals
the per-key reference (``tests/test_merge_kernel.py`` iterates the registry too).
"""

from __future__ import annotations

import pytest
import torch

from optimizer.merge import available_methods, get_method
from optimizer.merge.methods import FINITE
from tests.merge_cases import parents_for, sample_params

METHODS = available_methods()


def _parents(n: int, *, shape=(6, 9), seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [(base + 0.3 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def _call(method, parents, params, *, seed: int | None = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.empty_like(parents[0]) if out is None else out
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    result = method(parents, out=out, generator=generator, **params)
    assert result is out
    return out


@pytest.mark.parametrize("name", METHODS)
def test_metadata_states_formula_source_and_ranges(name: str) -> None:
    m = get_method(name)
    assert m.name == name and m.doc and "Source:" in m.doc, f"{name}: the docstring must state the formula and a 'Source:'"
    assert 1 <= m.min_parents <= m.max_parents <= 5
    for param, default in m.params.items():
        assert m.ranges.get(param, FINITE).contains(float(default)), (name, param)
    for n in range(m.min_parents, m.max_parents + 1):
        m.check_params(sample_params(m, n, seed=n), n_parents=n)  # the sampled values are in range


@pytest.mark.parametrize("name", METHODS)
def test_writes_out_leaves_parents_alone_and_is_deterministic(name: str) -> None:
    m = get_method(name)
    for n in sorted({m.min_parents, parents_for(m), m.max_parents}):
        parents = _parents(n, seed=n)
        copies = [p.clone() for p in parents]
        params = sample_params(m, n, seed=1)
        big = torch.full((3, parents[0].numel()), 7.0)
        out = _call(m, parents, params, out=big[1].view(parents[0].shape))
        assert all(torch.equal(p, c) for p, c in zip(parents, copies, strict=True)), f"{name} wrote into a parent"
        assert torch.equal(big[0], torch.full_like(big[0], 7.0)) and torch.equal(big[2], torch.full_like(big[2], 7.0))
        assert out.dtype == parents[0].dtype and bool(torch.isfinite(out).all())
        again = _call(m, parents, params)
        assert torch.equal(out, again), f"{name} is not deterministic for one generator seed"
        other = _call(m, parents, params, seed=99)
        if not m.stochastic:
            assert torch.equal(out, other) and torch.equal(out, _call(m, parents, params, seed=None)), f"{name} reads the generator"


@pytest.mark.parametrize("name", METHODS)
def test_identical_parents_give_that_tensor(name: str) -> None:
    m = get_method(name)
    n = parents_for(m)
    (p,) = _parents(1, seed=5)
    out = _call(m, [p.clone() for _ in range(n)], sample_params(m, n, seed=2))
    torch.testing.assert_close(out, p, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).coefficients is not None])
def test_linear_methods_equal_their_coefficients(name: str) -> None:
    m = get_method(name)
    for n in range(m.min_parents, m.max_parents + 1):
        parents, params = _parents(n, seed=3), sample_params(m, n, seed=n)
        coefficients = m.coefficients(n, params)
        expected = sum(c * p.double() for c, p in zip(coefficients, parents, strict=True))
        torch.testing.assert_close(_call(m, parents, params).double(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in METHODS if get_method(n).granularity == "elementwise"])
def test_elementwise_methods_do_not_see_across_positions(name: str) -> None:
    m = get_method(name)
    n = parents_for(m)
    first, second = _parents(n, shape=(40,), seed=1), _parents(n, shape=(23,), seed=2)
    params = sample_params(m, n, seed=4)
    whole = _call(m, [torch.cat([a, b]) for a, b in zip(first, second, strict=True)], params)
    torch.testing.assert_close(whole, torch.cat([_call(m, first, params), _call(m, second, params)]), atol=0, rtol=0)


@pytest.mark.parametrize("name", METHODS)
def test_half_inputs_match_the_fp32_computation(name: str) -> None:
    m = get_method(name)
    n = parents_for(m)
    parents, params = _parents(n, shape=(32, 33), seed=6, dtype=torch.float16), sample_params(m, n, seed=5)
    half = _call(m, parents, params)
    assert half.dtype == torch.float16
    full = _call(m, [p.float() for p in parents], params)
    torch.testing.assert_close(half.float(), full, atol=1e-2, rtol=1e-2)
