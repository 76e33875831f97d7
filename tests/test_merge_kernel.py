"""ParentBank + Merger against the per-key reference, on synthetic SD1 state dicts."""

from __future__ import annotations

import random

import pytest
import torch

from optimizer.architectures import LayoutError, load_layout
from optimizer.merge import (
    MergeMethodError,
    Merger,
    MergeRecipe,
    ParentBank,
    ParentMismatchError,
    RecipeError,
    available_methods,
    get_method,
    merge_state_dicts_reference,
)
from optimizer.merge.flat import SEGMENT_ALIGN
from tests.merge_cases import parents_for, sample_value
from tests.synthetic import POSITION_IDS_KEY, VAE_KEYS, synthetic_state_dicts

LAYOUT = load_layout("sd1")
#: every registered method (weighted_sum with two parents: the bank tests below merge A and B; 3-5 parents are tested apart)
N_PARENTS = {**{name: parents_for(name) for name in available_methods()}, "weighted_sum": 2}


def _random_recipe(method: str, *, seed: int, n: int | None = None, merge_vae: bool = False) -> MergeRecipe:
    rng = random.Random(seed)
    m = get_method(method)
    params = {p: {b: sample_value(m, p, rng) for b in LAYOUT.blocks} for p in m.param_names(n or N_PARENTS[method])}
    return MergeRecipe(method=method, params=params, seed=seed, merge_vae=merge_vae)


def _bank(n: int, dtype=torch.float32, **kw) -> tuple[list[dict], ParentBank]:
    sds = synthetic_state_dicts(n=n, dtype=dtype, **kw)
    return sds, ParentBank.build(state_dicts=sds, layout=LAYOUT)


# ---------------------------------------------------------------- bank


def test_bank_segments_follow_mbw_order_and_cover_everything():
    sds, bank = _bank(2)
    names = list(bank.segments)
    assert names == [*LAYOUT.blocks, "VAE"]
    pos = 0
    for name, seg in bank.segments.items():
        aligned = -(-pos // SEGMENT_ALIGN) * SEGMENT_ALIGN
        assert seg.start == aligned and seg.start % SEGMENT_ALIGN == 0 and seg.numel > 0, name
        assert not bank.buffers[0][pos:aligned].any()  # padding between segments is zeros
        pos = aligned
        for span in seg.spans:
            assert span.owner == name and span.offset == pos
            assert LAYOUT.owner_of(span.key) == name
            assert torch.equal(span.view(bank.buffers[1]), sds[1][span.key])
            pos += span.numel
        assert seg.end == pos
    assert bank.numel == -(-pos // SEGMENT_ALIGN) * SEGMENT_ALIGN == bank.buffers[0].numel()
    assert bank.segments["VAE"].component and not bank.segments["BASE"].component
    assert {s.key for s in bank.segments["VAE"].spans} == set(VAE_KEYS)
    assert set(bank.passthrough) == {POSITION_IDS_KEY}
    assert bank.passthrough[POSITION_IDS_KEY].dtype == torch.int64
    assert bank.keys == tuple(sds[0])
    assert all(b.is_contiguous() and b.dim() == 1 for b in bank.buffers)


def test_bank_dtype_default_given_and_promoted():
    sds = synthetic_state_dicts(n=2, dtype=torch.float16)
    assert ParentBank.build(state_dicts=sds, layout=LAYOUT).dtype == torch.float16
    assert ParentBank.build(state_dicts=sds, layout=LAYOUT, dtype=torch.float32).dtype == torch.float32
    sds[1] = {k: (v.float() if v.is_floating_point() else v) for k, v in sds[1].items()}
    assert ParentBank.build(state_dicts=sds, layout=LAYOUT).dtype == torch.float32


def test_float_position_ids_are_not_merged():
    sds = synthetic_state_dicts(n=2)
    for i, sd in enumerate(sds):
        sd[POSITION_IDS_KEY] = torch.arange(77, dtype=torch.float32).reshape(1, 77) + 100 * i
    merger = Merger(ParentBank.build(state_dicts=sds, layout=LAYOUT))
    merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=0.5))
    assert torch.equal(merger.state_dict()[POSITION_IDS_KEY], sds[0][POSITION_IDS_KEY])


def test_bank_mismatch_errors_name_the_key():
    a, b = synthetic_state_dicts(n=2)
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    bad = dict(b)
    bad[key] = torch.zeros(6, 7)
    with pytest.raises(ParentMismatchError, match=r"key 'model\.diffusion_model\.input_blocks\.4\.1\.proj_in\.weight': parent 1 has shape \(6, 7\), parent 0 has \(6, 6\)"):
        ParentBank.build(state_dicts=[a, bad], layout=LAYOUT)
    missing = {k: v for k, v in b.items() if k != key}
    with pytest.raises(ParentMismatchError, match=r"parent 1 lacks 1 key\(s\) of parent 0: 'model\.diffusion_model\.input_blocks\.4\.1\.proj_in\.weight'"):
        ParentBank.build(state_dicts=[a, missing], layout=LAYOUT)
    extra = {**b, "model.diffusion_model.input_blocks.4.2.extra": torch.zeros(1)}
    with pytest.raises(ParentMismatchError, match=r"parent 1 has 1 key\(s\) that parent 0 lacks: 'model\.diffusion_model\.input_blocks\.4\.2\.extra'"):
        ParentBank.build(state_dicts=[a, extra], layout=LAYOUT)
    with pytest.raises(LayoutError, match="lora_unet_foo"):
        ParentBank.build(state_dicts=[{"lora_unet_foo": torch.zeros(1)}], layout=LAYOUT)


# ---------------------------------------------------------------- kernel == reference


@pytest.mark.parametrize("method", sorted(N_PARENTS))
@pytest.mark.parametrize("merge_vae", [False, True])
def test_kernel_matches_reference_fp32(method, merge_vae):
    sds, bank = _bank(N_PARENTS[method], delta_scale=0.1)
    merger = Merger(bank)
    for trial in range(2):
        recipe = _random_recipe(method, seed=trial, merge_vae=merge_vae)
        stats = merger.merge(recipe)
        ref = merge_state_dicts_reference(state_dicts=sds, layout=LAYOUT, recipe=recipe)
        got = merger.state_dict()
        assert list(got) == list(ref) == list(sds[0])
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6, msg=lambda m, k=key: f"{k}: {m}")
        if get_method(method).granularity == "elementwise":
            assert stats.calls == 26 + merge_vae
        else:
            assert stats.calls == len(bank.spans) - (0 if merge_vae else len(bank.segments["VAE"].spans))


@pytest.mark.parametrize("method", sorted(N_PARENTS))
def test_kernel_matches_reference_fp16(method):
    sds, bank = _bank(N_PARENTS[method], dtype=torch.float16, delta_scale=0.1)
    merger = Merger(bank)
    recipe = _random_recipe(method, seed=3)
    merger.merge(recipe)
    ref = merge_state_dicts_reference(state_dicts=sds, layout=LAYOUT, recipe=recipe)
    for key, value in merger.state_dict().items():
        assert value.dtype == sds[0][key].dtype
        torch.testing.assert_close(value, ref[key], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_weighted_sum_of_many_matches_reference(n):
    sds, bank = _bank(n)
    recipe = _random_recipe("weighted_sum", seed=n, n=n)
    merger = Merger(bank)
    merger.merge(recipe)
    ref = merge_state_dicts_reference(state_dicts=sds, layout=LAYOUT, recipe=recipe)
    for key, value in merger.state_dict().items():
        torch.testing.assert_close(value, ref[key], atol=1e-6, rtol=1e-6)
    merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, **dict.fromkeys(["alpha", "beta", "gamma", "delta"][: n - 1], 0.0)))
    for key, value in merger.state_dict().items():
        assert torch.equal(value, sds[0][key]), key


def test_dare_is_reproducible_and_equal_to_reference():
    sds, bank = _bank(3, delta_scale=0.1)
    merger = Merger(bank)
    recipe = _random_recipe("dare", seed=11)
    merger.merge(recipe)
    first = {k: v.clone() for k, v in merger.state_dict().items()}
    ref = merge_state_dicts_reference(state_dicts=sds, layout=LAYOUT, recipe=recipe)
    for key in ref:
        assert torch.equal(first[key], ref[key]), key
    merger.merge(recipe.model_copy(update={"seed": 12}))
    assert any(not torch.equal(first[k], v) for k, v in merger.state_dict().items())
    merger.merge(recipe.model_copy(update={"seed": 12}), generator_seed=11)
    for key, value in merger.state_dict().items():
        assert torch.equal(first[key], value), key


# ---------------------------------------------------------------- identities through the kernel


def test_weighted_sum_identities_whole_and_per_block():
    sds, bank = _bank(2)
    merger = Merger(bank)
    views = merger.state_dict()
    for alpha, want in ((0.0, sds[0]), (1.0, sds[1])):
        merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=alpha))
        for key, value in views.items():
            expected = sds[0][key] if key in VAE_KEYS or key == POSITION_IDS_KEY else want[key]
            assert torch.equal(value, expected), key
    ones = {b for i, b in enumerate(LAYOUT.blocks) if i % 3 == 1}
    recipe = MergeRecipe.from_mbw(method="weighted_sum", layout=LAYOUT, mbw={b: float(b in ones) for b in LAYOUT.blocks})
    merger.merge(recipe)
    for key, value in views.items():
        owner = LAYOUT.owner_of(key)
        expected = sds[1][key] if owner in ones and key != POSITION_IDS_KEY else sds[0][key]
        assert torch.equal(value, expected), key


def test_add_difference_and_task_vector_identities_through_kernel():
    sds, bank = _bank(3)
    merger = Merger(bank)
    merger.merge(MergeRecipe.uniform(method="add_difference", layout=LAYOUT, alpha=0.0))
    for key, value in merger.state_dict().items():
        assert torch.equal(value, sds[0][key]), key
    sds2, bank2 = _bank(2)
    merger2 = Merger(bank2)
    for recipe in (
        MergeRecipe.uniform(method="ties", layout=LAYOUT, alpha=1.0, density=1.0),
        MergeRecipe.uniform(method="dare", layout=LAYOUT, alpha=1.0, drop_rate=0.0),
        MergeRecipe.uniform(method="slerp", layout=LAYOUT, alpha=1.0),
    ):
        merger2.merge(recipe)
        for key, value in merger2.state_dict().items():
            expected = sds2[0][key] if key in VAE_KEYS or key == POSITION_IDS_KEY else sds2[1][key]
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=lambda m, k=key, r=recipe.method: f"{r} {k}: {m}")


# ---------------------------------------------------------------- buffer reuse, VAE, errors


def test_output_storage_is_reused_and_only_changed_blocks_change():
    sds, bank = _bank(2)
    merger = Merger(bank)
    views = merger.state_dict()
    ptr = merger.output.data_ptr()
    r1 = _random_recipe("weighted_sum", seed=1)
    merger.merge(r1)
    before = {k: v.clone() for k, v in views.items()}
    changed = {"IN04", "M00", "OUT11"}
    alpha = {b: (v + 0.25 if b in changed else v) for b, v in r1.params["alpha"].items()}
    merger.merge(r1.model_copy(update={"params": {"alpha": alpha}}))
    assert merger.output.data_ptr() == ptr
    after = merger.state_dict()
    for key, view in after.items():
        assert view is views[key]
        if key != POSITION_IDS_KEY:
            lo, hi = ptr, ptr + merger.output.numel() * merger.output.element_size()
            assert lo <= view.data_ptr() < hi
        differs = not torch.equal(view, before[key])
        assert differs == (LAYOUT.owner_of(key) in changed and key != POSITION_IDS_KEY), key


def test_vae_copied_from_parent0_by_default_and_merged_on_request():
    sds, bank = _bank(2)
    merger = Merger(bank)
    recipe = _random_recipe("weighted_sum", seed=5)
    merger.merge(recipe)
    for key in VAE_KEYS:
        assert torch.equal(merger.state_dict()[key], sds[0][key])
    stats = merger.merge(recipe.model_copy(update={"merge_vae": True}))
    assert stats.merged_vae
    base_alpha = recipe.params["alpha"]["BASE"]
    for key in VAE_KEYS:
        torch.testing.assert_close(merger.state_dict()[key], torch.lerp(sds[0][key], sds[1][key], base_alpha))
    stats = merger.merge(recipe)
    assert stats.copied_elements == bank.segments["VAE"].numel
    for key in VAE_KEYS:
        assert torch.equal(merger.state_dict()[key], sds[0][key])
    assert merger.merge(recipe).copied_elements == 0


def test_merge_errors_leave_output_untouched():
    sds, bank = _bank(2)
    merger = Merger(bank)
    merger.merge(_random_recipe("weighted_sum", seed=2))
    snapshot = merger.output.clone()
    with pytest.raises(MergeMethodError, match=r"'add_difference' takes 3 parents, got 2"):
        merger.merge(MergeRecipe.uniform(method="add_difference", layout=LAYOUT, alpha=0.5))
    r = MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=0.5)
    missing = {"alpha": {b: v for b, v in r.params["alpha"].items() if b != "IN11"}}
    with pytest.raises(RecipeError, match=r"no value for block\(s\) \['IN11'\]"):
        merger.merge(MergeRecipe(method="weighted_sum", params=missing))
    with pytest.raises(MergeMethodError, match=r"'density' for block BASE must be in \(0, 1\], got 0.0"):
        Merger(_bank(3)[1]).merge(MergeRecipe.uniform(method="ties", layout=LAYOUT, density=0.0))
    with pytest.raises(MergeMethodError, match=r"'drop_rate' for block BASE must be in \[0, 1\), got 1.0"):
        Merger(_bank(3)[1]).merge(MergeRecipe.uniform(method="dare", layout=LAYOUT, drop_rate=1.0))
    assert torch.equal(merger.output, snapshot)


# ---------------------------------------------------------------- a model sees merges without reloading


class _Tiny(torch.nn.Module):
    """Parameters named like a slice of the SD1 state dict; output depends on several blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        dm = torch.nn.Module()
        self.model.diffusion_model = dm
        dm.time_embed = torch.nn.Sequential(torch.nn.Linear(6, 12, bias=False))
        attn = torch.nn.Module()
        attn.proj_in = torch.nn.Conv2d(6, 6, 1, bias=False)
        dm.middle_block = torch.nn.ModuleList([torch.nn.Identity(), attn])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dm = self.model.diffusion_model
        return dm.time_embed(dm.middle_block[1].proj_in(x).mean((2, 3))).sum()


def test_module_assigned_from_views_follows_merges():
    sds, bank = _bank(2)
    with torch.inference_mode():  # even then, the output buffer must be able to back Parameters
        merger = Merger(bank)
    model = _Tiny()
    names = set(model.state_dict())
    views = {k: v for k, v in merger.state_dict().items() if k in names}
    assert set(views) == names
    model.load_state_dict(views, assign=True)
    x = torch.randn(1, 6, 4, 4)
    with torch.no_grad():
        merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=0.0))
        y0 = model(x)
        merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=1.0))
        y1 = model(x)
    assert not torch.allclose(y0, y1)
    fresh = _Tiny()
    fresh.load_state_dict({k: sds[1][k] for k in names})
    with torch.no_grad():
        torch.testing.assert_close(y1, fresh(x))
    for name, p in model.named_parameters():
        assert p.data_ptr() == views[name].data_ptr()
