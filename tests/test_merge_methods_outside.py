"""The merge methods against the libraries that define them: sd-mecha (train difference, clamped add
difference, n-average, geometric median, DELLA, Model Stock) and mergekit (Model Breadcrumbs, Model
Stock, TIES), on the same tensors; DELLA on the same random draws."""

from __future__ import annotations

import pytest
import torch

from optimizer.merge import get_method


def _run(name: str, parents: list[torch.Tensor], *, generator: torch.Generator | None = None, **params: float) -> torch.Tensor:
    out = torch.empty_like(parents[0])
    get_method(name)(parents, out=out, generator=generator, **params)
    return out


def _parents(n: int, shape=(24, 40), *, seed: int = 0, scale: float = 0.1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base] + [base + scale * torch.randn(shape, generator=g) for _ in range(n - 1)]


# ------------------------------------------------------------------------------ sd-mecha
@pytest.fixture(scope="module")
def mecha():
    pytest.importorskip("sd_mecha")
    from sd_mecha.extensions.builtin.merge_methods import limiting, linear, ties

    return {"linear": linear, "limiting": limiting, "ties": ties}


@pytest.mark.parametrize("alpha", [0.4, 1.0, -0.7])
def test_train_difference_is_sd_mechas(mecha, alpha: float) -> None:
    a, b, c = _parents(3, seed=1)
    b[0, :5] = a[0, :5]  # |B - A| = 0: nothing added
    c[1, :5], b[1, :5] = a[1, :5], a[1, :5]  # 0 / 0
    mask = mecha["linear"].train_difference_mask.__wrapped__(a, b, c, alpha=torch.tensor(alpha))
    expected = a + mask * (b - c)  # sd-mecha: add_difference(a, subtract(b, c) * train_difference_mask(a, b, c))
    torch.testing.assert_close(_run("train_difference", [a, b, c], alpha=alpha), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.5])
def test_add_difference_clamped_is_sd_mechas_clamp_to_ab(mecha, alpha: float) -> None:
    a, b, c = _parents(3, seed=2)
    expected = mecha["limiting"].clamp.__wrapped__(a + alpha * (b - c), a, b)  # add_difference(a, b, c, clamp_to_ab=True)
    out = _run("add_difference_clamped", [a, b, c], alpha=alpha)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert bool(((out >= torch.minimum(a, b)) & (out <= torch.maximum(a, b))).all())


@pytest.mark.parametrize("n", [2, 3, 5])
def test_n_average_is_sd_mechas(mecha, n: int) -> None:
    parents = _parents(n, seed=3, scale=1.0)
    expected = mecha["linear"].n_average.__wrapped__(*({"k": p} for p in parents), key="k")
    torch.testing.assert_close(_run("n_average", parents), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_geometric_median_is_sd_mechas_weiszfeld(mecha, n: int) -> None:
    parents = _parents(n, seed=4, scale=1.0)
    parents[-1] = parents[-1] + 20.0  # one outlier: the median stays near the others, the mean does not
    expected = mecha["ties"].geometric_median.__wrapped__(*parents)
    out = _run("geometric_median", parents)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    mean = torch.stack(parents).mean(0)
    assert (out - parents[0]).norm() < (mean - parents[0]).norm()


@pytest.mark.parametrize(("drop_rate", "epsilon"), [(0.5, 0.0), (0.7, 0.2), (0.3, 0.5)])
def test_della_is_sd_mechas_ties_sum_with_dropout_on_the_same_draws(mecha, drop_rate: float, epsilon: float) -> None:
    """sd-mecha's DELLA with TIES' sum election (vote_sgn), no top-k (k=1) and no model-stock factor
    (apply_stock=True sets its t to 1); its generator seeded as ours."""
    parents = _parents(4, seed=5)
    base, models = parents[0], parents[1:]
    deltas = [m - base for m in models]
    for alpha in (1.0, 0.6):
        delta = mecha["ties"].ties_sum_with_dropout.__wrapped__(*deltas, probability=drop_rate, della_eps=epsilon, rescale=True, k=1.0,
                                                                vote_sgn=True, apply_stock=True, seed=123)
        ours = _run("della", parents, generator=torch.Generator().manual_seed(123), alpha=alpha, drop_rate=drop_rate, epsilon=epsilon)
        torch.testing.assert_close(ours, base + alpha * delta, atol=1e-5, rtol=1e-5)


def test_della_keeps_large_changes_more_often() -> None:
    parents = _parents(2, shape=(200_000,), seed=6)
    delta = parents[1] - parents[0]
    big = delta.abs() > delta.abs().median()
    out = _run("della", parents, generator=torch.Generator().manual_seed(0), alpha=1.0, drop_rate=0.5, epsilon=0.4)
    kept = out != parents[0]
    assert kept[big].float().mean() > kept[~big].float().mean() + 0.15
    assert kept.float().mean() == pytest.approx(0.5, abs=0.01)


def test_model_stock_of_two_1d_task_vectors_is_sd_mechas(mecha) -> None:
    base, m1, m2 = _parents(3, shape=(500,), seed=7)
    expected = base + mecha["ties"].model_stock.__wrapped__(m1 - base, m2 - base)
    torch.testing.assert_close(_run("model_stock", [base, m1, m2], alpha=1.0), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ mergekit
@pytest.fixture(scope="module")
def mergekit():
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    return registry, TensorGroup


def _mergekit(mergekit, name: str, parents: list[torch.Tensor], **parameters):
    registry, TensorGroup = mergekit
    group = TensorGroup.from_tensors(parents, base_index=0)
    per_model = {k: {i: v for i in range(1, len(parents))} for k, v in parameters.pop("per_model", {}).items()}
    return registry.get(name).merge_group(group, **per_model, **parameters)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_model_stock_is_mergekits(mergekit, n: int) -> None:
    parents = _parents(n, seed=8)
    parents[2] = parents[0] + 0.5 * (parents[1] - parents[0]) + 0.05 * torch.randn(parents[0].shape)  # correlated task vectors
    expected = _mergekit(mergekit, "model_stock", parents, filter_wise=False)
    torch.testing.assert_close(_run("model_stock", parents, alpha=1.0), expected, atol=1e-5, rtol=1e-5)
    ours_half = _run("model_stock", parents, alpha=0.5)
    torch.testing.assert_close(ours_half - parents[0], 0.5 * (expected - parents[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.8, 0.3), (1.0, 0.05), (0.2, 0.0)])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_breadcrumbs_is_mergekits(mergekit, density: float, gamma: float, alpha: float) -> None:
    parents = _parents(3, seed=9)
    expected = _mergekit(mergekit, "breadcrumbs", parents, per_model={"weight": 1.0, "density": density, "gamma": gamma},
                         **{"lambda": alpha, "normalize": False, "rescale": False, "int8_mask": False})
    torch.testing.assert_close(_run("breadcrumbs", parents, alpha=alpha, density=density, gamma=gamma), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("density", [0.25, 0.5, 1.0])
def test_ties_is_mergekits_where_the_top_k_count_is_whole(mergekit, density: float) -> None:
    """mergekit keeps int(density * N) entries, evomerge ceil(density * N) (and ties): equal when whole."""
    parents = _parents(4, shape=(16, 32), seed=10)
    expected = _mergekit(mergekit, "ties", parents, per_model={"weight": 1.0, "density": density},
                         **{"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False})
    torch.testing.assert_close(_run("ties", parents, alpha=1.0, density=density), expected, atol=1e-6, rtol=1e-6)
