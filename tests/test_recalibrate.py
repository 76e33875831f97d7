"""Norm recalibration after a merge (:mod:`optimizer.merge.recalibrate`) on a tiny random UNet and
on the embedded zoo's trained UNets."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimizer.merge.errors import MergeError
from optimizer.merge.recalibrate import (
    CalibrationBatch,
    NormStats,
    RecalibrationError,
    collect_norm_statistics,
    interpolate_statistics,
    make_calibration_batch,
    norm_layers,
    recalibrate_norms,
)
from optimizer.zoo import paths

ZOO = paths.default_zoo_dir()
needs_zoo = pytest.mark.skipif(
    not all(paths.model_file(ZOO, n).is_file() for n in ("base", "shape", "other_init")),
    reason="studies/zoo models are missing (evomerge zoo build)",
)
TIMESTEPS = [999, 800, 600, 400, 300, 200, 100, 20]
PROMPTS = ["a red 3 on a blue background", "a thin green 7 on a white background", "a slanted yellow 1 on a black background", ""]


# ---------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
    )
    # random affine parameters, so that parents differ in their norms too
    with torch.no_grad():
        for m in norm_layers(unet).values():
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.3)
    return unet.eval()


def tiny_batch(size: int = 4, seed: int = 0) -> CalibrationBatch:
    ehs = torch.randn(size, 5, 32, generator=torch.Generator().manual_seed(seed + 100))
    return make_calibration_batch(encoder_hidden_states=ehs, timesteps=TIMESTEPS[:size], latent_shape=(4, 8, 8), seed=seed)


def lerp_into(target: nn.Module, a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """``target <- (1 - alpha) * a + alpha * b`` over the state dicts (what the merge kernel computes)."""
    sa, sb = a.state_dict(), b.state_dict()
    target.load_state_dict({k: torch.lerp(v, sb[k], alpha) if v.is_floating_point() else v for k, v in sa.items()})
    return target


def norm_params(unet: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": getattr(m, p).detach().clone() for n, m in norm_layers(unet).items() for p in ("weight", "bias")}


def assert_params_equal(before: dict[str, torch.Tensor], unet: nn.Module, *, atol: float = 0.0, rtol: float = 0.0) -> None:
    after = norm_params(unet)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=atol, rtol=rtol, msg=key)


def assert_stats_match(measured: dict[str, NormStats], targets: dict[str, NormStats], *, atol: float, rtol: float) -> None:
    assert list(measured) == list(targets)
    for name, t in targets.items():
        torch.testing.assert_close(measured[name].mean, t.mean, atol=atol, rtol=rtol, msg=lambda m: f"{name} mean: {m}")
        torch.testing.assert_close(measured[name].std, t.std, atol=atol, rtol=rtol, msg=lambda m: f"{name} std: {m}")


def log_std_ratio(measured: dict[str, NormStats], targets: dict[str, NormStats]) -> torch.Tensor:
    """``log(sigma_M / sigma_t)`` of every channel of every layer, flat."""
    return torch.cat([torch.log(measured[n].std / targets[n].std).flatten() for n in targets])


def no_hooks_left(unet: nn.Module) -> bool:
    return all(not m._forward_hooks and not getattr(m, "_forward_hooks_with_kwargs", None) for m in unet.modules())


@pytest.fixture(scope="module")
def tiny():
    """Two tiny parents, their 50/50 merge, a batch and the interpolated targets."""
    a, b = tiny_unet(1), tiny_unet(2)
    batch = tiny_batch()
    parents = [collect_norm_statistics(unet=u, batch=batch) for u in (a, b)]
    targets = interpolate_statistics(parents=parents, weights={n: (0.5, 0.5) for n in parents[0]})
    return {"a": a, "b": b, "batch": batch, "parents": parents, "targets": targets}


def tiny_merged(tiny, alpha: float = 0.5) -> nn.Module:
    return lerp_into(copy.deepcopy(tiny["a"]), tiny["a"], tiny["b"], alpha)


# ---------------------------------------------------------------- zoo helpers


@pytest.fixture(scope="module")
def zoo():
    """Zoo pipelines ``base``, ``shape``, ``other_init`` and a calibration batch of 8 (latents, timesteps)."""
    from optimizer.zoo.build import load_zoo_pipeline

    pipes = {name: load_zoo_pipeline(name) for name in ("base", "shape", "other_init")}
    ehs = encode(pipes["base"].tokenizer, pipes["base"].text_encoder)
    batch = make_calibration_batch(encoder_hidden_states=ehs, timesteps=TIMESTEPS, latent_shape=(4, 8, 8), seed=0)
    return {"pipes": pipes, "batch": batch}


def encode(tokenizer, text_encoder) -> torch.Tensor:
    ids = tokenizer(PROMPTS * 2, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return text_encoder(ids.input_ids)[0]


def zoo_merge(zoo, a: str, b: str, alpha: float):
    """The merged UNet and the targets of ``(1 - alpha) * a + alpha * b`` (UNet and text encoder
    merged; every model measured on its own text encoder's conditioning of the same prompts)."""
    pa, pb = zoo["pipes"][a], zoo["pipes"][b]
    batch: CalibrationBatch = zoo["batch"]
    parents = [
        collect_norm_statistics(unet=p.unet, batch=batch.with_encoder_hidden_states(encode(p.tokenizer, p.text_encoder)))
        for p in (pa, pb)
    ]
    targets = interpolate_statistics(parents=parents, weights={n: (1 - alpha, alpha) for n in parents[0]})
    unet = lerp_into(copy.deepcopy(pa.unet), pa.unet, pb.unet, alpha)
    text_encoder = lerp_into(copy.deepcopy(pa.text_encoder), pa.text_encoder, pb.text_encoder, alpha)
    return unet, batch.with_encoder_hidden_states(encode(pa.tokenizer, text_encoder)), targets


# ---------------------------------------------------------------- layers, batch, statistics


def test_norm_layers_in_module_order_skipping_non_affine():
    unet = tiny_unet(0)
    expected = [n for n, m in unet.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    assert list(norm_layers(unet)) == expected and len(expected) == 33
    assert any(isinstance(m, nn.LayerNorm) for m in norm_layers(unet).values())
    unet.conv_norm_out = nn.GroupNorm(8, 32, affine=False)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.norm1 = nn.LayerNorm(32, elementwise_affine=False)
    block.norm2 = nn.LayerNorm(32, bias=False)  # cannot be shifted: not recalibratable
    names = list(norm_layers(unet))
    assert names == [n for n in expected if n not in {"conv_norm_out", *(f"down_blocks.0.attentions.0.transformer_blocks.0.{x}" for x in ("norm1", "norm2"))}]


def test_make_calibration_batch_is_seeded_and_checked():
    ehs = torch.randn(1, 5, 32)
    a = make_calibration_batch(encoder_hidden_states=ehs, timesteps=[999, 500, 1], latent_shape=(4, 8, 6), seed=3)
    b = make_calibration_batch(encoder_hidden_states=ehs[0], timesteps=[999, 500, 1], latent_shape=(4, 8, 6), seed=3)
    c = make_calibration_batch(encoder_hidden_states=ehs, timesteps=[999, 500, 1], latent_shape=(4, 8, 6), seed=4)
    assert a.sample.shape == (3, 4, 8, 6) and a.sample.dtype == torch.float32 and a.size == 3
    assert torch.equal(a.sample, b.sample) and not torch.equal(a.sample, c.sample)
    assert a.timestep.tolist() == [999, 500, 1] and a.timestep.dtype == torch.long
    assert a.encoder_hidden_states.shape == (3, 5, 32) and torch.equal(a.encoder_hidden_states[2], ehs[0])
    assert 0.7 < float(a.sample.std()) < 1.3
    other = a.with_encoder_hidden_states(torch.zeros(3, 7, 16))
    assert other.sample is a.sample and other.encoder_hidden_states.shape == (3, 7, 16)
    with pytest.raises(RecalibrationError, match="timesteps is empty"):
        make_calibration_batch(encoder_hidden_states=ehs, timesteps=[], latent_shape=(4, 8, 8), seed=0)
    with pytest.raises(RecalibrationError, match="latent_shape"):
        make_calibration_batch(encoder_hidden_states=ehs, timesteps=[1], latent_shape=(8, 8), seed=0)
    with pytest.raises(RecalibrationError, match="encoder_hidden_states"):
        make_calibration_batch(encoder_hidden_states=torch.randn(2, 5, 32), timesteps=[1, 2, 3], latent_shape=(4, 8, 8), seed=0)
    with pytest.raises(RecalibrationError, match="encoder_hidden_states"):
        a.with_encoder_hidden_states(torch.zeros(2, 7, 16))
    with pytest.raises(RecalibrationError, match="timestep"):
        CalibrationBatch(sample=torch.zeros(2, 4, 8, 8), timestep=torch.zeros(3), encoder_hidden_states=torch.zeros(2, 5, 32))
    assert issubclass(RecalibrationError, MergeError) and issubclass(RecalibrationError, ValueError)


def test_collect_statistics_are_per_channel_float32_and_leave_no_hooks(tiny):
    unet, batch = tiny["a"], tiny["batch"]
    stats = tiny["parents"][0]
    assert list(stats) == list(norm_layers(unet))
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out.detach().double()))
        for name, m in norm_layers(unet).items()
    ]
    try:
        with torch.no_grad():
            unet(batch.sample, batch.timestep, encoder_hidden_states=batch.encoder_hidden_states)
    finally:
        for h in handles:
            h.remove()
    for name, module in norm_layers(unet).items():
        y = outputs[name]
        dims = [0, 2, 3] if isinstance(module, nn.GroupNorm) else [0, 1]  # [B,C,H,W] / [B,T,C]
        s = stats[name]
        assert s.mean.dtype == torch.float32 and s.mean.shape == s.std.shape == module.weight.shape
        torch.testing.assert_close(s.mean.double(), y.mean(dim=dims), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s.std.double(), y.std(dim=dims, correction=0), atol=1e-5, rtol=1e-5)
    assert no_hooks_left(unet)
    subset = collect_norm_statistics(unet=unet, batch=batch, layers=["conv_norm_out", "mid_block.resnets.0.norm1"])
    assert list(subset) == ["conv_norm_out", "mid_block.resnets.0.norm1"]
    torch.testing.assert_close(subset["conv_norm_out"].std, stats["conv_norm_out"].std)


def test_interpolate_statistics_is_the_weighted_sum(tiny):
    pa, pb = tiny["parents"]
    names = list(pa)
    targets = interpolate_statistics(parents=[pa, pb], weights={n: (0.25, 0.75) if i % 2 else (1.0, 0.0) for i, n in enumerate(names)})
    assert list(targets) == names
    for i, n in enumerate(names):
        wa, wb = (0.25, 0.75) if i % 2 else (1.0, 0.0)
        torch.testing.assert_close(targets[n].mean, wa * pa[n].mean + wb * pb[n].mean)
        torch.testing.assert_close(targets[n].std, wa * pa[n].std + wb * pb[n].std)


# ---------------------------------------------------------------- (a) targets reached


def test_recalibrated_tiny_merge_matches_targets(tiny):
    unet, batch, targets = tiny_merged(tiny), tiny["batch"], tiny["targets"]
    before = collect_norm_statistics(unet=unet, batch=batch)
    assert log_std_ratio(before, targets).abs().mean() > 0.05  # there is something to correct
    stats = recalibrate_norms(unet=unet, batch=batch, targets=targets)
    assert stats.layers == 33 and stats.passes == 1 and stats.guarded_channels == 0 and stats.seconds > 0
    assert 0 < stats.mean_abs_log_scale <= stats.max_abs_log_scale
    assert_stats_match(collect_norm_statistics(unet=unet, batch=batch), targets, atol=1e-5, rtol=1e-4)
    assert no_hooks_left(unet)
    # a second call is a no-op to float tolerance (and so is a second pass)
    params = norm_params(unet)
    again = recalibrate_norms(unet=unet, batch=batch, targets=targets, passes=2)
    assert again.passes == 2 and again.mean_abs_log_scale < 1e-5
    assert_params_equal(params, unet, atol=1e-5, rtol=1e-5)


def test_recalibrate_a_subset_of_layers(tiny):
    unet, batch, targets = tiny_merged(tiny), tiny["batch"], tiny["targets"]
    group_norms = [n for n, m in norm_layers(unet).items() if isinstance(m, nn.GroupNorm)]
    layer_norms = [n for n in norm_layers(unet) if n not in group_norms]
    params = norm_params(unet)
    stats = recalibrate_norms(unet=unet, batch=batch, targets=targets, layers=group_norms)  # extra LayerNorm targets ignored
    assert stats.layers == len(group_norms)
    after = collect_norm_statistics(unet=unet, batch=batch, layers=group_norms)
    assert_stats_match(after, {n: targets[n] for n in group_norms}, atol=1e-5, rtol=1e-4)
    for n in layer_norms:
        assert torch.equal(norm_params(unet)[f"{n}.weight"], params[f"{n}.weight"])


@needs_zoo
@pytest.mark.parametrize(("other", "collapse"), [("other_init", True), ("shape", False)])
def test_zoo_merge_recalibrated_to_targets(zoo, other, collapse, capsys):
    """(e) base + other_init (different initialisations) at alpha 0.5: output stds collapse below the
    interpolated targets before recalibration and match them after; base + shape (a fine-tune of
    base) drifts far less."""
    unet, batch, targets = zoo_merge(zoo, "base", other, 0.5)
    ratio_before = log_std_ratio(collect_norm_statistics(unet=unet, batch=batch), targets)
    stats = recalibrate_norms(unet=unet, batch=batch, targets=targets)
    after = collect_norm_statistics(unet=unet, batch=batch)
    ratio_after = log_std_ratio(after, targets)
    with capsys.disabled():
        print(
            f"\nbase+{other} alpha 0.5: mean |log(sigma_M/sigma_t)| {ratio_before.abs().mean():.4f} -> {ratio_after.abs().mean():.2e}, "
            f"mean log {ratio_before.mean():+.4f}, {stats.layers} layers in {stats.seconds * 1000:.0f} ms"
        )
    assert stats.layers == len(norm_layers(unet)) == 109
    assert_stats_match(after, targets, atol=1e-4, rtol=1e-4)
    assert ratio_after.abs().mean() < 1e-5
    if collapse:
        assert ratio_before.abs().mean() > 0.1 and ratio_before.mean() < -0.05  # variance collapse
    else:
        assert ratio_before.abs().mean() < 0.05


# ---------------------------------------------------------------- (b) no-ops


def test_own_statistics_leave_parameters_unchanged(tiny):
    unet, batch = tiny_merged(tiny), tiny["batch"]
    params = norm_params(unet)
    stats = recalibrate_norms(unet=unet, batch=batch, targets=collect_norm_statistics(unet=unet, batch=batch))
    assert stats.mean_abs_log_scale < 1e-6
    assert_params_equal(params, unet, atol=1e-6, rtol=1e-6)


@needs_zoo
def test_alpha_zero_merge_with_weights_one_zero_is_a_no_op(zoo):
    unet, batch, targets = zoo_merge(zoo, "base", "other_init", 0.0)
    params = norm_params(unet)
    assert_params_equal(norm_params(zoo["pipes"]["base"].unet), unet)  # alpha 0 is parent A
    stats = recalibrate_norms(unet=unet, batch=batch, targets=targets)
    assert stats.max_abs_log_scale < 1e-5
    assert_params_equal(params, unet, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- (c) in place


def _flat_views(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One flat buffer holding every tensor, and ``{key: view}`` into it (as the merge kernel's Merger)."""
    flat = torch.cat([v.detach().to(dtype).flatten() for v in state_dict.values()])
    views, offset = {}, 0
    for key, value in state_dict.items():
        views[key] = flat[offset : offset + value.numel()].view(value.shape)
        offset += value.numel()
    return flat, views


@pytest.mark.parametrize("flat_buffer", [False, True])
def test_parameters_are_modified_in_place(tiny, flat_buffer):
    unet = tiny_merged(tiny)
    flat = None
    if flat_buffer:
        flat, views = _flat_views(unet.state_dict(), torch.float32)
        unet.load_state_dict(views, assign=True)
    layers = norm_layers(unet)
    before = {n: (m.weight, m.bias, m.weight.data_ptr(), m.bias.data_ptr(), m.weight.dtype, m.weight.detach().clone()) for n, m in layers.items()}
    if flat is not None:
        start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
        assert all(start <= b[2] < end and start <= b[3] < end for b in before.values())
        flat_before = flat.clone()
    recalibrate_norms(unet=unet, batch=tiny["batch"], targets=tiny["targets"])
    for name, module in norm_layers(unet).items():
        weight, bias, wptr, bptr, dtype, old = before[name]
        assert module.weight is weight and module.bias is bias
        assert isinstance(module.weight, nn.Parameter)
        assert module.weight.data_ptr() == wptr and module.bias.data_ptr() == bptr and module.weight.dtype == dtype
    changed = sum(not torch.equal(b[0].detach(), b[5]) for b in before.values())
    assert changed == len(before)
    if flat is not None:
        assert not torch.equal(flat, flat_before)  # the correction went into the shared buffer
        assert_stats_match(collect_norm_statistics(unet=unet, batch=tiny["batch"]), tiny["targets"], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- (d) errors


def test_interpolate_statistics_errors(tiny):
    pa, pb = tiny["parents"]
    weights = {n: (0.5, 0.5) for n in pa}
    partial = {n: s for n, s in pb.items() if n != "conv_norm_out"}
    with pytest.raises(RecalibrationError, match=r"parent 1 has no statistics for layer\(s\) \['conv_norm_out'\]"):
        interpolate_statistics(parents=[pa, partial], weights=weights)
    with pytest.raises(RecalibrationError, match=r"no interpolation weights for layer\(s\) \['conv_norm_out'\]"):
        interpolate_statistics(parents=[pa, pb], weights={n: w for n, w in weights.items() if n != "conv_norm_out"})
    with pytest.raises(RecalibrationError, match="'conv_norm_out': 3 weight\\(s\\) for 2 parents"):
        interpolate_statistics(parents=[pa, pb], weights={**weights, "conv_norm_out": (0.2, 0.3, 0.5)})
    with pytest.raises(RecalibrationError, match="negative target std"):
        interpolate_statistics(parents=[pa, pb], weights={**weights, "conv_norm_out": (-1.0, 0.0)})
    with pytest.raises(RecalibrationError, match="finite"):
        interpolate_statistics(parents=[pa, pb], weights={**weights, "conv_norm_out": (math.nan, 0.0)})
    wrong = {**pb, "conv_norm_out": NormStats(mean=torch.zeros(16), std=torch.ones(16))}
    with pytest.raises(RecalibrationError, match="shape"):
        interpolate_statistics(parents=[pa, wrong], weights=weights)
    with pytest.raises(RecalibrationError, match="at least one parent"):
        interpolate_statistics(parents=[], weights=weights)


def test_recalibrate_errors_change_nothing(tiny):
    unet, batch, targets = tiny_merged(tiny), tiny["batch"], tiny["targets"]
    params = norm_params(unet)
    without = {n: s for n, s in targets.items() if n != "mid_block.resnets.0.norm1"}
    with pytest.raises(RecalibrationError, match=r"targets have no statistics for layer\(s\) \['mid_block.resnets.0.norm1'\]"):
        recalibrate_norms(unet=unet, batch=batch, targets=without)
    with pytest.raises(RecalibrationError, match="no module 'nope'"):
        recalibrate_norms(unet=unet, batch=batch, targets={**targets, "nope": targets["conv_norm_out"]})
    with pytest.raises(RecalibrationError, match="conv_in' is a Conv2d, not a GroupNorm or LayerNorm"):
        recalibrate_norms(unet=unet, batch=batch, targets=targets, layers=["conv_in"])
    with pytest.raises(RecalibrationError, match="the layer has \\(32,\\) channels"):
        recalibrate_norms(unet=unet, batch=batch, targets={**targets, "conv_norm_out": NormStats(mean=torch.zeros(16), std=torch.ones(16))})
    negative = NormStats(mean=torch.zeros(32), std=-torch.ones(32))
    with pytest.raises(RecalibrationError, match="non-negative stds"):
        recalibrate_norms(unet=unet, batch=batch, targets={**targets, "conv_norm_out": negative})
    with pytest.raises(RecalibrationError, match="passes"):
        recalibrate_norms(unet=unet, batch=batch, targets=targets, passes=0)
    with pytest.raises(RecalibrationError, match="sequence of layer names"):
        collect_norm_statistics(unet=unet, batch=batch, layers="conv_norm_out")
    assert_params_equal(params, unet)
    # a non-affine layer asked for, by name or through its targets
    unet.conv_norm_out = nn.GroupNorm(8, 32, affine=False)
    for call in (
        lambda: recalibrate_norms(unet=unet, batch=batch, targets=targets),
        lambda: recalibrate_norms(unet=unet, batch=batch, targets=targets, layers=["conv_norm_out"]),
        lambda: collect_norm_statistics(unet=unet, batch=batch, layers=["conv_norm_out"]),
    ):
        with pytest.raises(RecalibrationError, match="'conv_norm_out' \\(GroupNorm\\) has no affine weight and bias"):
            call()
    assert_params_equal({k: v for k, v in params.items() if not k.startswith("conv_norm_out")}, unet)
    assert no_hooks_left(unet)


def test_layer_run_twice_raises_and_restores(tiny):
    unet, batch, targets = tiny_merged(tiny), tiny["batch"], tiny["targets"]
    # share one GroupNorm between two resnets (same channel count): it runs twice per forward
    shared = unet.down_blocks[1].resnets[0].norm2
    unet.up_blocks[0].resnets[0].norm2 = shared
    assert "up_blocks.0.resnets.0.norm2" not in norm_layers(unet)  # listed once, under its first name
    params = norm_params(unet)
    with pytest.raises(RecalibrationError, match="'down_blocks.1.resnets.0.norm2' ran more than once"):
        recalibrate_norms(unet=unet, batch=batch, targets={n: targets[n] for n in norm_layers(unet)})
    assert_params_equal(params, unet)  # upstream layers corrected before the error were restored
    with pytest.raises(RecalibrationError, match="ran more than once"):
        collect_norm_statistics(unet=unet, batch=batch)
    with pytest.raises(RecalibrationError, match="are the same module"):
        collect_norm_statistics(unet=unet, batch=batch, layers=["down_blocks.1.resnets.0.norm2", "up_blocks.0.resnets.0.norm2"])
    assert no_hooks_left(unet)
    # leaving it out works
    layers = [n for n in norm_layers(unet) if n != "down_blocks.1.resnets.0.norm2"]
    recalibrate_norms(unet=unet, batch=batch, targets=targets, layers=layers)
    assert_stats_match(collect_norm_statistics(unet=unet, batch=batch, layers=layers), {n: targets[n] for n in layers}, atol=1e-5, rtol=1e-4)


def test_forward_error_removes_hooks_and_restores(tiny):
    unet, targets = tiny_merged(tiny), tiny["targets"]
    bad = make_calibration_batch(encoder_hidden_states=torch.randn(1, 5, 32), timesteps=[10, 20], latent_shape=(3, 8, 8), seed=0)
    params = norm_params(unet)
    with pytest.raises(RuntimeError):
        recalibrate_norms(unet=unet, batch=bad, targets=targets)
    with pytest.raises(RuntimeError):
        collect_norm_statistics(unet=unet, batch=bad)
    assert no_hooks_left(unet)
    assert_params_equal(params, unet)
    # a layer the forward never reaches
    unet.add_module("unused_norm", nn.GroupNorm(8, 32))
    with pytest.raises(RecalibrationError, match=r"never ran layer\(s\) \['unused_norm'\]"):
        collect_norm_statistics(unet=unet, batch=tiny["batch"])
    stats = NormStats(mean=torch.zeros(32), std=torch.ones(32))
    with pytest.raises(RecalibrationError, match="never ran"):
        recalibrate_norms(unet=unet, batch=tiny["batch"], targets={**targets, "unused_norm": stats})
    assert_params_equal(params, unet)


def test_zero_std_channels_are_shifted_only(tiny):
    unet, batch, targets = tiny_merged(tiny), tiny["batch"], tiny["targets"]
    with torch.no_grad():
        unet.conv_norm_out.weight[:3] = 0.0  # those output channels are constant (= beta)
    stats = recalibrate_norms(unet=unet, batch=batch, targets=targets)
    assert stats.guarded_channels == 3
    assert torch.equal(unet.conv_norm_out.weight[:3], torch.zeros(3))  # scale kept at 1: still 0
    after = collect_norm_statistics(unet=unet, batch=batch, layers=["conv_norm_out"])["conv_norm_out"]
    torch.testing.assert_close(after.mean, targets["conv_norm_out"].mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after.std[3:], targets["conv_norm_out"].std[3:], atol=1e-5, rtol=1e-4)
    assert torch.all(after.std[:3] < 1e-6)


# ---------------------------------------------------------------- (f) fp16


def _cpu_fp16_supported() -> str | None:
    try:
        x = torch.randn(2, 8, 4, 4, dtype=torch.float16)
        F.group_norm(x, 4)
        F.layer_norm(x.flatten(2).transpose(1, 2), (8,))
        F.conv2d(x, torch.randn(8, 8, 3, 3, dtype=torch.float16))
    except RuntimeError as exc:
        return f"this torch has no CPU fp16 kernels for GroupNorm/LayerNorm/conv: {exc}"
    return None


@pytest.mark.skipif(_cpu_fp16_supported() is not None, reason=str(_cpu_fp16_supported()))
def test_fp16_unet_on_cpu_in_a_flat_buffer(tiny):
    unet = tiny_merged(tiny).to(torch.float16)
    flat, views = _flat_views(unet.state_dict(), torch.float16)
    unet.load_state_dict(views, assign=True)
    layers = norm_layers(unet)
    ptrs = {n: (m.weight, m.weight.data_ptr(), m.bias.data_ptr()) for n, m in layers.items()}
    before = collect_norm_statistics(unet=unet, batch=tiny["batch"])
    assert all(s.mean.dtype == torch.float32 for s in before.values())
    stats = recalibrate_norms(unet=unet, batch=tiny["batch"], targets=tiny["targets"], passes=2)
    for name, module in norm_layers(unet).items():
        assert module.weight is ptrs[name][0] and module.weight.data_ptr() == ptrs[name][1] and module.bias.data_ptr() == ptrs[name][2]
        assert module.weight.dtype == module.bias.dtype == torch.float16
    assert stats.passes == 2 and math.isfinite(stats.mean_abs_log_scale)
    after = collect_norm_statistics(unet=unet, batch=tiny["batch"])
    err_before = log_std_ratio(before, tiny["targets"]).abs().mean()
    err_after = log_std_ratio(after, tiny["targets"]).abs().mean()
    assert err_after < 5e-3 < err_before
    assert_stats_match(after, tiny["targets"], atol=2e-2, rtol=2e-2)
