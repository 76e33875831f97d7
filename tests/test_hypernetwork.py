"""A1111 hypernetworks (optimizer.adapters.hypernetwork): file format, safety, attention math, stacking.

The UNet is a tiny seeded UNet2DConditionModel: self-attention on 32 channels, cross-attention on
a 64-wide context, so a hypernetwork with width 64 acts on cross-attention only and one with
width 32 on self-attention only (like the zoo models).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optimizer.adapters.hypernetwork import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkAttnProcessor,
    HypernetworkError,
    HypernetworkFileNotFoundError,
    HypernetworkStack,
    HypernetworkStructure,
    install_hypernetworks,
    load_hypernetwork,
    parse_dropout_structure,
    remove_hypernetworks,
    save_hypernetwork,
)

CONTEXT_DIM = 64
CHANNELS = 32


class Evil:
    """Pickled by reference (tests.test_hypernetwork.Evil): weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "not a tensor"


@pytest.fixture(scope="module")
def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(CHANNELS, CHANNELS),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return model.eval().requires_grad_(False)


@pytest.fixture
def unet(_tiny_unet):
    """The shared tiny UNet, with default processors before and after each test."""
    remove_hypernetworks(_tiny_unet)
    yield _tiny_unet
    remove_hypernetworks(_tiny_unet)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 7, CONTEXT_DIM, generator=generator)
    return sample, torch.tensor([10, 500]), context


def _run(unet, inputs) -> torch.Tensor:
    sample, timestep, context = inputs
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context).sample


def _bumped(hypernetwork: Hypernetwork, *, seed: int, scale: float = 0.3) -> Hypernetwork:
    """Give every parameter a sizeable random value (fresh ones are ~0.01, too close to identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in hypernetwork.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return hypernetwork


def _new(name: str, *, dims=(CONTEXT_DIM, CHANNELS), seed: int = 0, **kwargs) -> Hypernetwork:
    return _bumped(Hypernetwork.new(dims=dims, name=name, seed=seed, **kwargs), seed=seed + 100)


def _attentions(unet) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


def _mlp_by_hand(state: dict[str, torch.Tensor], x: torch.Tensor, *, n_linear: int, strength: float = 1.0) -> torch.Tensor:
    """``x + strength * mlp(x)`` for a linear-activation module of consecutive ``linear.{i}`` layers."""
    h = x
    for i in range(n_linear):
        h = F.linear(h, state[f"linear.{i}.weight"], state[f"linear.{i}.bias"])
    return x + strength * h


def _two_linears(rand, d: int, first: str, second: str) -> dict[str, torch.Tensor]:
    """State dict of a [1, 2, 1] linear-activation module with the given layer key prefixes."""
    return {f"{first}.weight": rand(2 * d, d), f"{first}.bias": rand(2 * d), f"{second}.weight": rand(d, 2 * d), f"{second}.bias": rand(d)}


# --------------------------------------------------------------------------------------------
# (a) files: round trip, A1111's own layout


def test_save_load_round_trip(tmp_path: Path) -> None:
    hn = _new("round", activation="relu", layer_norm=True, layer_structure=(1, 1.5, 2, 1), dropout_structure=(0, 0.3, 0.3, 0))
    hn.step, hn.sd_checkpoint, hn.sd_checkpoint_name = 1234, "a1b2c3d4", "base-model"
    path = save_hypernetwork(hn, tmp_path / "round.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["round.pt"]  # no temporary file left behind

    raw = torch.load(path, map_location="cpu", weights_only=True)  # A1111's layout, loadable safely
    assert [k for k in raw if isinstance(k, int)] == [CONTEXT_DIM, CHANNELS]
    assert len(raw[CONTEXT_DIM]) == 2 and "linear.0.weight" in raw[CONTEXT_DIM][0]
    assert raw["layer_structure"] == [1, 1.5, 2, 1] and raw["activation_func"] == "relu"
    assert raw["is_layer_norm"] is True and raw["use_dropout"] is True and raw["last_layer_dropout"] is True
    assert raw["dropout_structure"] == [0, 0.3, 0.3, 0] and raw["activate_output"] is False

    loaded = load_hypernetwork(path)
    assert loaded.structure == hn.structure
    assert (loaded.name, loaded.dims, loaded.step, loaded.weight_init) == ("round", (CONTEXT_DIM, CHANNELS), 1234, "Normal")
    assert (loaded.sd_checkpoint, loaded.sd_checkpoint_name) == ("a1b2c3d4", "base-model")
    assert loaded.state_dict().keys() == hn.state_dict().keys()
    for key, tensor in hn.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(3, 5, CONTEXT_DIM)
    assert torch.equal(loaded.apply_k(x), hn.apply_k(x)) and torch.equal(loaded.apply_v(x), hn.apply_v(x))


def test_hand_written_a1111_files_load(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    # a plain file: linear activation, int keys -> list of two state dicts, no dropout_structure
    plain = {
        d: [_two_linears(rand, d, "linear.0", "linear.1") for _ in range(2)] for d in (CONTEXT_DIM, CHANNELS)
    }
    plain.update(name="plain", layer_structure=[1, 2, 1], activation_func="linear", is_layer_norm=False,
                 weight_initialization="Normal", use_dropout=False, step=77, sd_checkpoint="abc", sd_checkpoint_name="sd15",
                 optimizer_name="AdamW",  # optimizer state (ignored) in the file itself
                 optimizer_state_dict={"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5, "params": [0]}]})
    torch.save(plain, tmp_path / "plain.pt")
    hn = load_hypernetwork(tmp_path / "plain.pt")
    assert (hn.name, hn.dims, hn.step) == ("plain", (CONTEXT_DIM, CHANNELS), 77)
    x = torch.randn(2, 5, CONTEXT_DIM)
    expected_k = _mlp_by_hand(plain[CONTEXT_DIM][0], x, n_linear=2)
    expected_v = _mlp_by_hand(plain[CONTEXT_DIM][1], x, n_linear=2)
    torch.testing.assert_close(hn.apply_k(x), expected_k)
    torch.testing.assert_close(hn.apply_v(x), expected_v)
    hn.strength = 0.25
    torch.testing.assert_close(hn.apply_k(x), _mlp_by_hand(plain[CONTEXT_DIM][0], x, n_linear=2, strength=0.25))

    # relu + layer norm + use_dropout, no activate_output / dropout_structure / last_layer_dropout
    # fields: A1111's defaults (activate_output true on load, [0, 0.3, 0, 0]) give the Sequential
    # Linear0 ReLU1 LN2 Dropout3 Linear4 ReLU5 LN6 Linear7 ReLU8 LN9
    d = CHANNELS
    widths = [d, 2 * d, 2 * d, d]
    module_state: dict[str, torch.Tensor] = {}
    for index, (i, o) in zip((0, 4, 7), zip(widths, widths[1:])):
        module_state |= {f"linear.{index}.weight": rand(o, i), f"linear.{index}.bias": rand(o)}
        module_state |= {f"linear.{index + 2}.weight": 1 + rand(o), f"linear.{index + 2}.bias": rand(o)}
    relu = {d: (module_state, {k: v * 0.5 for k, v in module_state.items()}), "layer_structure": [1, 2, 2, 1],
            "activation_func": "relu", "is_layer_norm": True, "use_dropout": True}
    torch.save(relu, tmp_path / "relu.pt")
    hn = load_hypernetwork(tmp_path / "relu.pt")
    assert hn.name == "relu"  # no name field: the file stem
    assert hn.structure == HypernetworkStructure(layer_structure=(1, 2, 2, 1), activation="relu", layer_norm=True,
                                                 activate_output=True, dropout_structure=(0, 0.3, 0, 0))
    x = torch.randn(4, d)
    h = x
    for index, width in zip((0, 4, 7), widths[1:]):
        h = torch.relu(F.linear(h, module_state[f"linear.{index}.weight"], module_state[f"linear.{index}.bias"]))
        h = F.layer_norm(h, (width,), module_state[f"linear.{index + 2}.weight"], module_state[f"linear.{index + 2}.bias"])
    torch.testing.assert_close(hn.apply_k(x), x + h)

    # the oldest layout: no structure fields at all, linear1 / linear2 keys
    old = {d: [_two_linears(rand, d, "linear1", "linear2") for _ in range(2)]}
    torch.save(old, tmp_path / "oldest.pt")
    hn = load_hypernetwork(tmp_path / "oldest.pt")
    assert hn.structure == HypernetworkStructure(activate_output=True) and hn.dims == (d,)  # A1111 load defaults
    renamed = {"linear.0.weight": old[d][0]["linear1.weight"], "linear.0.bias": old[d][0]["linear1.bias"],
               "linear.1.weight": old[d][0]["linear2.weight"], "linear.1.bias": old[d][0]["linear2.bias"]}
    torch.testing.assert_close(hn.apply_k(x), _mlp_by_hand(renamed, x, n_linear=2))


def test_a1111_dropout_defaults_and_activation_table() -> None:
    assert parse_dropout_structure(layer_structure=[1, 2, 1], use_dropout=False, last_layer_dropout=True) == (0, 0, 0)
    assert parse_dropout_structure(layer_structure=[1, 2, 2, 1], use_dropout=True, last_layer_dropout=False) == (0, 0.3, 0, 0)
    assert parse_dropout_structure(layer_structure=[1, 2, 2, 1], use_dropout=True, last_layer_dropout=True) == (0, 0.3, 0.3, 0)
    assert parse_dropout_structure(layer_structure=[1, 1], use_dropout=True, last_layer_dropout=True) == (0, 0.3)
    assert "gelu" in ACTIVATIONS and "softsign" in ACTIVATIONS and "glu" not in ACTIVATIONS
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish  # A1111's table, quirk included


# --------------------------------------------------------------------------------------------
# (b) strength 0 and removal are exact


def test_strength_zero_and_remove_are_bit_identical(unet, inputs) -> None:
    baseline = _run(unet, inputs)
    stack = HypernetworkStack([_new("a")])
    assert install_hypernetworks(unet, HypernetworkStack()) == len(_attentions(unet))
    assert torch.equal(_run(unet, inputs), baseline)  # the processor's math is AttnProcessor2_0's

    install_hypernetworks(unet, stack)
    stack.set_strengths([0.0])
    assert torch.equal(_run(unet, inputs), baseline)
    stack.set_strengths([1.0])
    assert not torch.allclose(_run(unet, inputs), baseline, atol=1e-4)

    assert remove_hypernetworks(unet) == len(_attentions(unet))
    from diffusers.models.attention_processor import AttnProcessor2_0

    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert torch.equal(_run(unet, inputs), baseline)
    assert not any("hypernetwork" in k or "layers." in k for k in unet.state_dict())


# --------------------------------------------------------------------------------------------
# (c) one attention layer by hand


def _attention_by_hand(attn, hidden: torch.Tensor, context_k: torch.Tensor, context_v: torch.Tensor) -> torch.Tensor:
    b, n, _ = hidden.shape
    heads = attn.heads
    q, k, v = attn.to_q(hidden), attn.to_k(context_k), attn.to_v(context_v)
    d = q.shape[-1] // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, heads * d)
    return attn.to_out[0](out)


def test_attention_layer_matches_hand_computation(unet) -> None:
    hn = _new("hand", activation="tanh")
    hn.strength = 0.7
    install_hypernetworks(unet, HypernetworkStack([hn]))
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 16, CHANNELS, generator=g)
    context = torch.randn(2, 7, CONTEXT_DIM, generator=g)

    k_mod, v_mod = hn.pair(CONTEXT_DIM)
    with torch.no_grad():
        cross = block.attn2(hidden, encoder_hidden_states=context)
        ctx_k = context + 0.7 * k_mod.linear(context)
        ctx_v = context + 0.7 * v_mod.linear(context)
        torch.testing.assert_close(cross, _attention_by_hand(block.attn2, hidden, ctx_k, ctx_v))
        assert not torch.allclose(cross, _attention_by_hand(block.attn2, hidden, context, context), atol=1e-4)

        k_self, v_self = hn.pair(CHANNELS)
        own = block.attn1(hidden)  # self-attention: the context is the hidden states
        ctx_k, ctx_v = hidden + 0.7 * k_self.linear(hidden), hidden + 0.7 * v_self.linear(hidden)
        expected = _attention_by_hand(block.attn1, hidden, ctx_k, ctx_v)
        torch.testing.assert_close(own, expected)


# --------------------------------------------------------------------------------------------
# (d) several hypernetworks, strengths without reinstalling


def test_two_hypernetworks_apply_in_sequence(unet, inputs) -> None:
    a, b = _new("a", seed=1, activation="gelu"), _new("b", seed=2, layer_norm=True)
    x = torch.randn(2, 7, CONTEXT_DIM)
    stack = HypernetworkStack([a, b], strengths=[0.5, 2.0])
    with torch.no_grad():
        (ak, av), (bk, bv) = a.pair(CONTEXT_DIM), b.pair(CONTEXT_DIM)
        k = x + 0.5 * ak.linear(x)
        k = k + 2.0 * bk.linear(k)
        v = x + 0.5 * av.linear(x)
        v = v + 2.0 * bv.linear(v)
        got_k, got_v = stack(x)
        torch.testing.assert_close(got_k, k)
        torch.testing.assert_close(got_v, v)
        reversed_k, _ = HypernetworkStack([b, a])(x)
        assert not torch.allclose(reversed_k, got_k, atol=1e-4)  # order matters

    install_hypernetworks(unet, stack)
    both = _run(unet, inputs)
    stack.set_strengths({"b": 0.0})  # by name, no reinstall
    assert stack.strengths == [0.5, 0.0]
    only_a = _run(unet, inputs)
    assert not torch.allclose(only_a, both, atol=1e-4)
    install_hypernetworks(unet, HypernetworkStack([a]))
    assert torch.equal(_run(unet, inputs), only_a)  # a zero strength is exactly absent
    assert HypernetworkStack([a, b])["b"] is b and len(HypernetworkStack([a, b])) == 2


# --------------------------------------------------------------------------------------------
# (e) only the widths present are touched


def _record_key_contexts(unet) -> tuple[dict[str, tuple], list]:
    """Per attention layer: (context the layer was given, input of its to_k, input of its to_v)."""
    records: dict[str, list] = {}
    handles = []
    for name, attn in _attentions(unet).items():
        def pre(module, args, kwargs, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            records[name] = [hidden if context is None else context]

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.to_k.register_forward_pre_hook(lambda m, args, name=name: records[name].append(args[0])))
        handles.append(attn.to_v.register_forward_pre_hook(lambda m, args, name=name: records[name].append(args[0])))
    return records, handles


@pytest.mark.parametrize("dim", [CONTEXT_DIM, CHANNELS])
def test_only_matching_widths_are_affected(unet, inputs, dim: int) -> None:
    hn = _new(f"only{dim}", dims=(dim,))
    install_hypernetworks(unet, HypernetworkStack([hn]))
    records, handles = _record_key_contexts(unet)
    try:
        _run(unet, inputs)
    finally:
        for handle in handles:
            handle.remove()
    k_mod, v_mod = hn.pair(dim)
    cross = [n for n in records if n.endswith("attn2")]
    own = [n for n in records if n.endswith("attn1")]
    assert cross and own and len(cross) + len(own) == len(records)
    with torch.no_grad():
        for name, (context, k_in, v_in) in records.items():
            if context.shape[-1] == dim:
                torch.testing.assert_close(k_in, k_mod(context))
                torch.testing.assert_close(v_in, v_mod(context))
                assert not torch.allclose(k_in, context, atol=1e-4)
            else:
                assert k_in is context and v_in is context, name  # untouched: the very same tensor
    touched = cross if dim == CONTEXT_DIM else own
    assert all(records[n][0].shape[-1] == dim for n in touched)


# --------------------------------------------------------------------------------------------
# (f) bad inputs


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _valid_state() -> dict:
    return Hypernetwork.new(dims=(CHANNELS,), name="v", seed=0).state_for_a1111()


def test_unsafe_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(HypernetworkError, match=r"not a safe hypernetwork file.*Evil"):
        load_hypernetwork(_save({CHANNELS: [{}, {}], "extra": Evil()}, tmp_path / "evil.pt"))
    with pytest.raises(HypernetworkError, match=r"not\.a\.dict\.pt: not an A1111 hypernetwork: it holds a list"):
        load_hypernetwork(_save([1, 2, 3], tmp_path / "not.a.dict.pt"))
    with pytest.raises(HypernetworkError, match=r"no integer keys.*'768'.*strings"):
        load_hypernetwork(_save({"768": [{}, {}], "name": "x"}, tmp_path / "strkeys.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(HypernetworkError, match=r"garbage\.pt: not a readable torch file"):
        load_hypernetwork(tmp_path / "garbage.pt")
    with pytest.raises(HypernetworkFileNotFoundError, match="absent.pt") as info:
        load_hypernetwork(tmp_path / "absent.pt")
    assert isinstance(info.value, FileNotFoundError)


def test_bad_structures_and_state_dicts_name_the_fault(tmp_path: Path) -> None:
    state = _valid_state()
    state[CHANNELS][1]["linear.0.weight"] = torch.zeros(3, CHANNELS)
    del state[CHANNELS][1]["linear.1.bias"]
    state[CHANNELS][1]["linear.5.weight"] = torch.zeros(1)
    with pytest.raises(HypernetworkError) as info:
        load_hypernetwork(_save(state, tmp_path / "shapes.pt"))
    message = str(info.value)
    assert "shapes.pt: layer 32 value module" in message
    assert "wrong shape for 1 key(s): linear.0.weight (3, 32) (expected (64, 32))" in message
    assert "missing 1 key(s): linear.1.bias" in message and "unexpected 1 key(s): linear.5.weight" in message

    # layer norm claimed by the file but absent from the tensors
    state = _valid_state() | {"is_layer_norm": True}
    with pytest.raises(HypernetworkError, match=r"layer 32 key module.*is_layer_norm True(.|\n)*missing 4 key"):
        load_hypernetwork(_save(state, tmp_path / "ln.pt"))

    cases = {
        "activation_func": ("mystery", r"activation_func 'mystery' is not a known activation"),
        "layer_structure": ([2, 1], r"layer_structure must start and end with 1"),
        "dropout_structure": ([0, 1.5, 0], r"dropout_structure entries must be probabilities"),
        "is_layer_norm": ("yes", r"is_layer_norm must be true or false"),
    }
    for field, (value, pattern) in cases.items():
        with pytest.raises(HypernetworkError, match=rf"{field}\.pt: {pattern}"):
            load_hypernetwork(_save(_valid_state() | {field: value}, tmp_path / f"{field}.pt"))
    with pytest.raises(HypernetworkError, match=r"layer 32: expected \[key state dict, value state dict\], got a list of 1"):
        load_hypernetwork(_save(_valid_state() | {CHANNELS: [{}]}, tmp_path / "one.pt"))

    with pytest.raises(HypernetworkError, match="activation_func 'nope'"):
        Hypernetwork.new(dims=(8,), name="x", activation="nope")
    with pytest.raises(HypernetworkError, match="layer_structure must start and end with 1"):
        Hypernetwork.new(dims=(8,), name="x", layer_structure=(1, 2))
    with pytest.raises(HypernetworkError, match="dims"):
        Hypernetwork.new(dims=(), name="x")


def test_stack_and_install_misuse(unet) -> None:
    a = Hypernetwork.new(dims=(CHANNELS,), name="a")
    stack = HypernetworkStack([a])
    with pytest.raises(ValueError, match="already in this stack"):
        stack.append(a)
    with pytest.raises(ValueError, match="2 strength"):
        stack.set_strengths([1.0, 2.0])
    with pytest.raises(ValueError, match="no hypernetwork named 'zz'"):
        stack.set_strengths({"zz": 1.0})
    with pytest.raises(ValueError, match="finite"):
        stack.set_strengths([float("nan")])
    assert stack.strengths == [1.0]

    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor())
    try:
        with pytest.raises(ValueError, match=r"other than diffusers' AttnProcessor2_0.*\(AttnProcessor\)"):
            install_hypernetworks(unet, stack)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())


# --------------------------------------------------------------------------------------------
# (g) training


def test_gradients_reach_the_hypernetwork(unet, inputs) -> None:
    hn = Hypernetwork.new(dims=(CONTEXT_DIM, CHANNELS), name="train", activation="relu", seed=4)
    stack = HypernetworkStack([hn])
    assert not any(p.requires_grad for p in stack.parameters())
    stack.train()
    assert hn.training and all(p.requires_grad for p in stack.parameters())
    install_hypernetworks(unet, stack)
    optimizer = torch.optim.SGD(stack.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in hn.state_dict().items()}
    sample, timestep, context = inputs
    loss = unet(sample, timestep, encoder_hidden_states=context).sample.pow(2).mean()
    loss.backward()
    for name, parameter in hn.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(not torch.equal(before[k], v) for k, v in hn.state_dict().items())
    assert not any(p.requires_grad for p in unet.parameters())
    stack.eval()
    assert not any(p.requires_grad for p in stack.parameters())


# --------------------------------------------------------------------------------------------
# (h) dtypes


def test_float16_modules_and_dtype_on_load(tmp_path: Path) -> None:
    full = _new("half", dims=(CHANNELS,), activation="silu", layer_norm=True)
    half = _new("half", dims=(CHANNELS,), activation="silu", layer_norm=True).to(torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    x = torch.randn(3, 6, CHANNELS)
    out32 = half.apply_k(x)  # float16 MLP on a float32 context: the context keeps its dtype
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, full.apply_k(x), atol=2e-2, rtol=2e-2)
    out16 = half.apply_v(x.half())
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.float(), full.apply_v(x), atol=5e-2, rtol=5e-2)

    assert all(p.dtype == torch.float16 for p in Hypernetwork.new(dims=(8,), name="n", dtype=torch.float16).parameters())
    path = save_hypernetwork(half, tmp_path / "half.pt")
    assert all(p.dtype == torch.float16 for p in load_hypernetwork(path).parameters())  # default: the file's dtype
    as32 = load_hypernetwork(path, dtype=torch.float32, device="cpu")
    assert all(p.dtype == torch.float32 for p in as32.parameters())
    torch.testing.assert_close(as32.apply_k(x), out32, atol=1e-3, rtol=1e-3)


def test_new_is_seeded_and_a1111_initialised() -> None:
    a = Hypernetwork.new(dims=(CONTEXT_DIM,), name="a", seed=7, layer_norm=True)
    b = Hypernetwork.new(dims=(CONTEXT_DIM,), name="a", seed=7, layer_norm=True)
    c = Hypernetwork.new(dims=(CONTEXT_DIM,), name="a", seed=8, layer_norm=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.state_dict()["layers.64.0.linear.0.weight"], c.state_dict()["layers.64.0.linear.0.weight"])
    weight = a.state_dict()["layers.64.0.linear.0.weight"]
    assert abs(weight.std().item() - 0.01) < 0.002
    assert all(torch.count_nonzero(v) == 0 for k, v in a.state_dict().items() if k.endswith("bias"))
    x = torch.randn(2, CONTEXT_DIM)
    assert (a.apply_k(x) - x).abs().max() < 0.05  # starts close to the identity (|x| ~ 1)
    assert HypernetworkAttnProcessor(HypernetworkStack([a])).stack[0] is a
