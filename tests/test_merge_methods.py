"""Merge methods (identities, formulas, errors) and MergeRecipe."""

from __future__ import annotations

import math

import pytest
import torch

from optimizer.architectures import load_layout
from optimizer.merge import (
    MergeMethodError,
    MergeRecipe,
    RecipeError,
    available_methods,
    get_method,
    merge_method,
    tensor_seed,
)

LAYOUT = load_layout("sd1")


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _run(name: str, parents, generator=None, **params) -> torch.Tensor:
    out = torch.empty_like(parents[0])
    result = get_method(name).fn(parents, out=out, generator=generator, **params)
    assert result is out
    return out


A, B, C = _rand(5, 7, seed=1), _rand(5, 7, seed=2), _rand(5, 7, seed=3)


# ---------------------------------------------------------------- registry


def test_registry_lists_methods_with_metadata():
    assert set(available_methods()) >= {"weighted_sum", "add_difference", "ties", "dare", "slerp"}
    ws = get_method("weighted_sum")
    assert (ws.min_parents, ws.max_parents, ws.granularity) == (2, 5, "elementwise")
    assert "lerp" in ws.doc and "alpha" in ws.doc
    assert ws.param_names(2) == ("alpha",)
    assert ws.param_names(4) == ("alpha", "beta", "gamma")
    assert get_method("ties").granularity == "tensor" and get_method("dare").stochastic
    with pytest.raises(Exception):
        ws.name = "x"  # frozen


def test_unknown_method_lists_known_names():
    with pytest.raises(MergeMethodError, match=r"unknown merge method 'nope'.*weighted_sum"):
        get_method("nope")


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        merge_method(name="weighted_sum", parents=(2, 2), params={}, granularity="elementwise")(lambda p, **k: k["out"])


def test_parent_count_and_ranges_are_checked():
    with pytest.raises(MergeMethodError, match=r"'add_difference' takes 3 parents, got 2"):
        get_method("add_difference").check_parents(2)
    with pytest.raises(MergeMethodError, match=r"'slerp' takes 2 parents, got 3"):
        get_method("slerp").check_parents(3)
    ties = get_method("ties")
    for bad in (0.0, 1.5, -0.1, math.nan):
        with pytest.raises(MergeMethodError, match=r"'density' for block IN03 must be in \(0, 1\]"):
            ties.check_value("density", bad, block="IN03")
    ties.check_value("density", 1.0, block="IN03")
    with pytest.raises(MergeMethodError, match=r"'drop_rate' for block M00 must be in \[0, 1\)"):
        get_method("dare").check_value("drop_rate", 1.0, block="M00")
    for bad in (math.inf, 1.01, -0.01, 5.0):  # an interpolation weight: 0 gives A, 1 gives B, nothing beyond
        with pytest.raises(MergeMethodError, match=r"'alpha' for block BASE must be in \[0, 1\]"):
            get_method("weighted_sum").check_value("alpha", bad, block="BASE")
    for name in ("add_difference", "ties", "dare"):  # task-vector multipliers extrapolate on purpose, within reason
        get_method(name).check_value("alpha", 1.5)
        with pytest.raises(MergeMethodError, match=r"'alpha' must be in \[-3, 3\]"):
            get_method(name).check_value("alpha", 5.0)


# ---------------------------------------------------------------- identities


def test_weighted_sum_identities():
    assert torch.equal(_run("weighted_sum", [A, B], alpha=0.0), A)
    assert torch.equal(_run("weighted_sum", [A, B], alpha=1.0), B)
    torch.testing.assert_close(_run("weighted_sum", [A, B], alpha=0.3), 0.7 * A + 0.3 * B)
    assert torch.equal(_run("weighted_sum", [A, B, C], alpha=0.0, beta=0.0), A)
    torch.testing.assert_close(_run("weighted_sum", [A, B, C], alpha=0.2, beta=0.5), 0.3 * A + 0.2 * B + 0.5 * C)
    D = _rand(5, 7, seed=4)
    torch.testing.assert_close(_run("weighted_sum", [A, B, C, D], alpha=0.1, beta=0.2, gamma=0.3), 0.4 * A + 0.1 * B + 0.2 * C + 0.3 * D)


def test_weighted_sum_fp16_identities():
    a, b = A.half(), B.half()
    assert torch.equal(_run("weighted_sum", [a, b], alpha=0.0), a)
    assert torch.equal(_run("weighted_sum", [a, b], alpha=1.0), b)
    torch.testing.assert_close(_run("weighted_sum", [a, b], alpha=0.25).float(), 0.75 * a.float() + 0.25 * b.float(), atol=2e-3, rtol=2e-3)


def test_add_difference():
    assert torch.equal(_run("add_difference", [A, B, C], alpha=0.0), A)
    torch.testing.assert_close(_run("add_difference", [A, B, C], alpha=0.7), A + 0.7 * (B - C))


def test_ties_single_model_full_density_is_that_model():
    torch.testing.assert_close(_run("ties", [C, B], alpha=1.0, density=1.0), B, atol=1e-6, rtol=0)
    assert torch.equal(_run("ties", [C, B], alpha=0.0, density=0.5), C)


def test_ties_formula_by_hand():
    base = torch.zeros(6)
    m1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 0.1])
    m2 = torch.tensor([1.0, 2.0, -0.2, -3.0, -1.0, 0.2])
    # density 0.5 -> keep top 3 of 6 by |d|: m1 keeps 3, 2, -4 ; m2 keeps 2, -3, 1 (|1| ties with |-1|: kept)
    out = _run("ties", [base, m1, m2], alpha=1.0, density=0.5)
    # trimmed d1 = [3, 0, 0, 2, -4, 0]; d2 = [1, 2, 0, -3, -1, 0]
    # sum = [4, 2, 0, -1, -5, 0] -> sign [+, +, 0, -, -, 0]
    # agreeing means: [2, 2, 0, -3, -2.5, 0]
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 0.0, -3.0, -2.5, 0.0]))
    out = _run("ties", [base, m1, m2], alpha=0.5, density=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 0.0, -1.5, -1.25, 0.0]))


def test_dare_no_drop_is_mean_task_vector():
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(_run("dare", [C, B], generator=g, alpha=1.0, drop_rate=0.0), B, atol=1e-6, rtol=0)
    torch.testing.assert_close(_run("dare", [C, A, B], generator=g, alpha=1.0, drop_rate=0.0), C + ((A - C) + (B - C)) / 2)


def test_dare_rescales_kept_entries_and_is_seeded():
    base, model = torch.zeros(10_000), torch.ones(10_000)
    out = _run("dare", [base, model], generator=torch.Generator().manual_seed(5), alpha=1.0, drop_rate=0.75)
    values = set(out.unique().tolist())
    assert values <= {0.0, 4.0}
    assert 0.2 < (out != 0).float().mean().item() < 0.3
    again = _run("dare", [base, model], generator=torch.Generator().manual_seed(5), alpha=1.0, drop_rate=0.75)
    assert torch.equal(out, again)
    other = _run("dare", [base, model], generator=torch.Generator().manual_seed(6), alpha=1.0, drop_rate=0.75)
    assert not torch.equal(out, other)


def test_tensor_seed_is_stable_and_key_dependent():
    assert tensor_seed(0, "a.weight") == tensor_seed(0, "a.weight")
    assert tensor_seed(0, "a.weight") != tensor_seed(1, "a.weight") != tensor_seed(0, "b.weight")
    assert 0 <= tensor_seed(123, "x") < 2**63


def test_slerp_endpoints_parallel_and_formula():
    assert torch.equal(_run("slerp", [A, B], alpha=0.0), A)
    assert torch.equal(_run("slerp", [A, B], alpha=1.0), B)
    # parallel -> lerp
    torch.testing.assert_close(_run("slerp", [A, 2 * A], alpha=0.3), torch.lerp(A, 2 * A, 0.3))
    # zero norm -> lerp
    zero = torch.zeros_like(A)
    torch.testing.assert_close(_run("slerp", [zero, B], alpha=0.4), 0.4 * B)
    # orthogonal unit vectors: the midpoint stays on the unit circle
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(_run("slerp", [x, y], alpha=0.5), torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # general formula
    a, b = A.double().flatten(), B.double().flatten()
    w = torch.arccos(a @ b / (a.norm() * b.norm()))
    expected = (torch.sin(0.7 * w) * a + torch.sin(0.3 * w) * b) / torch.sin(w)
    torch.testing.assert_close(_run("slerp", [A, B], alpha=0.3).double().flatten(), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,n,params", [
    ("ties", 3, {"alpha": 0.8, "density": 0.4}),
    ("dare", 3, {"alpha": 0.8, "drop_rate": 0.3}),
    ("slerp", 2, {"alpha": 0.35}),
    ("add_difference", 3, {"alpha": 0.6}),
])
def test_half_inputs_match_fp32_computation(dtype, name, n, params):
    parents = [_rand(64, 33, seed=10 + i, dtype=dtype) for i in range(n)]
    gen = (lambda: torch.Generator().manual_seed(1)) if name == "dare" else (lambda: None)
    half = _run(name, parents, generator=gen(), **params)
    assert half.dtype == dtype
    full = _run(name, [p.float() for p in parents], generator=gen(), **params)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(half.float(), full, atol=tol, rtol=tol)


def test_methods_write_into_views_and_leave_parents_alone():
    big = torch.zeros(3, 35)
    parents = [A.clone(), B.clone()]
    for name in ("weighted_sum", "slerp", "ties", "dare"):
        params = dict(get_method(name).params)
        params = {p: params[p] for p in get_method(name).param_names(2)}
        gen = torch.Generator().manual_seed(0)
        out = big[1].view(5, 7)
        res = get_method(name).fn(parents, out=out, generator=gen, **params)
        assert res.data_ptr() == out.data_ptr()
        assert torch.equal(parents[0], A) and torch.equal(parents[1], B)
        assert torch.equal(big[0], torch.zeros(35)) and torch.equal(big[2], torch.zeros(35))


# ---------------------------------------------------------------- recipe


def test_recipe_uniform_and_mbw():
    r = MergeRecipe.uniform(method="ties", layout=LAYOUT, alpha=0.7)
    assert set(r.params) == {"alpha", "density"}
    assert r.params["density"]["OUT05"] == get_method("ties").params["density"]
    assert r.block_params("IN04") == {"alpha": 0.7, "density": 0.2}
    r.validate_for(LAYOUT, 3)
    mbw = ",".join(["0.5"] + ["0"] * 12 + ["1"] + ["0.25"] * 12)
    r = MergeRecipe.from_mbw(method="weighted_sum", layout=LAYOUT, mbw=mbw)
    assert r.params["alpha"]["BASE"] == 0.5 and r.params["alpha"]["M00"] == 1.0 and r.params["alpha"]["OUT11"] == 0.25
    assert r.to_mbw(layout=LAYOUT) == mbw
    r.validate_for(LAYOUT, 2)
    r3 = MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=0.2, beta=0.3)
    r3.validate_for(LAYOUT, 3)
    with pytest.raises(RecipeError, match=r"lacks parameter\(s\) \['beta'\]"):
        r.validate_for(LAYOUT, 3)
    with pytest.raises(RecipeError, match=r"\['beta'\] it does not take"):
        r3.validate_for(LAYOUT, 2)


def test_recipe_json_and_yaml_round_trip():
    r = MergeRecipe.from_mbw(method="dare", layout=LAYOUT, mbw=[i / 25 for i in range(26)], drop_rate=0.3, seed=7, merge_vae=True)
    assert MergeRecipe.model_validate_json(r.model_dump_json()) == r
    assert MergeRecipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(Exception):
        r.seed = 3  # frozen


def test_recipe_errors_name_the_field_and_block():
    with pytest.raises(ValueError, match="unknown merge method 'blend'"):
        MergeRecipe(method="blend", params={})
    r = MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=0.5)
    params = {"alpha": {b: v for b, v in r.params["alpha"].items() if b != "OUT07"}}
    with pytest.raises(RecipeError, match=r"'alpha' has no value for block\(s\) \['OUT07'\]"):
        MergeRecipe(method="weighted_sum", params=params).validate_for(LAYOUT, 2)
    params = {"alpha": {**r.params["alpha"], "IN12": 0.1}}
    with pytest.raises(RecipeError, match=r"block\(s\) \['IN12'\]"):
        MergeRecipe(method="weighted_sum", params=params).validate_for(LAYOUT, 2)
    with pytest.raises(MergeMethodError, match="takes 2 to 5 parents, got 1"):
        r.validate_for(LAYOUT, 1)
    bad = MergeRecipe.uniform(method="ties", layout=LAYOUT, density=0.5)
    bad_params = {**bad.params, "density": {**bad.params["density"], "IN05": 0.0}}
    with pytest.raises(MergeMethodError, match=r"'density' for block IN05 must be in \(0, 1\], got 0.0"):
        MergeRecipe(method="ties", params=bad_params).validate_for(LAYOUT, 2)
    with pytest.raises(MergeMethodError, match=r"'density' for block BASE .* got 1.5"):
        MergeRecipe.uniform(method="ties", layout=LAYOUT, density=1.5).validate_for(LAYOUT, 2)
    with pytest.raises(MergeMethodError, match=r"'drop_rate' for block BASE must be in \[0, 1\), got 1.0"):
        MergeRecipe.uniform(method="dare", layout=LAYOUT, drop_rate=1.0).validate_for(LAYOUT, 2)
    with pytest.raises(MergeMethodError, match=r"no parameter\(s\) \['density'\]"):
        MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, density=0.5)
