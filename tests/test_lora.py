"""LoRA: the formats, the mapping onto LDM keys, the in-place application in the merge kernel, LBW."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimizer.adapters.lbw import lbw_blocks, lbw_presets, parse_lbw
from optimizer.adapters.lora import LoraSet, load_lora, load_loras, lora_targets, uniform_strengths
from optimizer.adapters.lora_format import LoraError, parse_lora
from optimizer.architectures.layout import load_layout
from optimizer.merge import Merger, MergeRecipe, RecipeError
from optimizer.merge_files import load_parents
from optimizer.zoo import paths

SHARED_LORA = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "lora"
REAL_LORAS = sorted(SHARED_LORA.glob("*/pytorch_lora_weights.safetensors")) if SHARED_LORA.is_dir() else []
needs_shared = pytest.mark.skipif(not REAL_LORAS, reason="../shared/assets/lora (real SD1.5 LoRAs) is not present")
ZOO = paths.default_zoo_dir()
SD1 = load_layout("sd1")


# ---------------------------------------------------------------- an SD1.5-shaped model, without memory


@pytest.fixture(scope="module")
def sd15_targets():
    from optimizer.checkpoint.config_dir import diffusers_config_dir
    from optimizer.checkpoint.keymap import diffusers_to_ldm
    from optimizer.checkpoint.keymap_diffusers import empty_model, load_component_configs

    configs = load_component_configs(diffusers_config_dir("sd15"))
    unet = empty_model("unet", configs["unet"])
    text = empty_model("text_encoder", configs["text_encoder"])
    ldm = diffusers_to_ldm(components={"unet": unet.state_dict(), "text_encoder": text.state_dict()}, architecture="sd1", unet_config=configs["unet"])
    return lora_targets(architecture="sd1", shapes={k: tuple(v.shape) for k, v in ldm.items()}, unet_config=configs["unet"])


def _deltas(lora) -> dict[str, torch.Tensor]:
    return {l.target: l.scale * (l.up @ l.down) for l in lora.layers}


def _peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    return {f"unet.{k}": v for k, v in convert_unet_state_dict_to_peft(state).items()}


@needs_shared
@pytest.mark.parametrize("path", REAL_LORAS, ids=lambda p: p.parent.name)
def test_every_key_of_the_real_sd15_loras_maps_onto_an_sd15_unet(path: Path, sd15_targets) -> None:
    lora = load_lora(path, targets=sd15_targets, layout=SD1)
    assert lora.format == "diffusers-attnproc"
    assert len(lora.layers) * 2 == len(load_file(str(path))) == 256
    assert lora.rank == 4
    # plain LoRAs adapt exactly the attention blocks: the 17-value LBW layout minus BASE (the text encoder)
    assert set(lora.blocks) == set(lbw_blocks(layout=SD1, kind="lora")) - {"BASE"}
    for layer in lora.layers:
        assert layer.target.startswith("model.diffusion_model.") and layer.target.endswith(".weight")
        assert sd15_targets.shapes[layer.target][0] == layer.up.shape[0]


@needs_shared
def test_the_same_lora_in_peft_diffusers_and_kohya_formats_gives_the_same_updates(sd15_targets, tmp_path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya

    path = REAL_LORAS[0]
    reference = _deltas(load_lora(path, targets=sd15_targets, layout=SD1))
    peft = _peft(load_file(str(path)))
    variants = {
        "peft": peft,
        "diffusers": convert_state_dict_to_diffusers(peft),
        "kohya": convert_state_dict_to_kohya(peft),  # alpha = rank written next to each module
    }
    for fmt, state in variants.items():
        file = tmp_path / f"{fmt}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
        lora = load_lora(file, targets=sd15_targets, layout=SD1)
        assert lora.format == fmt
        deltas = _deltas(lora)
        assert deltas.keys() == reference.keys(), fmt
        for key, delta in reference.items():
            torch.testing.assert_close(deltas[key], delta, rtol=0, atol=0, msg=f"{fmt} {key}")


@needs_shared
def test_kohya_alpha_scales_the_update_and_ldm_style_kohya_names_map_too(sd15_targets, tmp_path: Path) -> None:
    from diffusers.utils import convert_state_dict_to_kohya

    path = REAL_LORAS[0]
    reference = _deltas(load_lora(path, targets=sd15_targets, layout=SD1))
    kohya = convert_state_dict_to_kohya(_peft(load_file(str(path))))
    halved = {k: (torch.tensor(2.0) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}  # alpha 2, rank 4
    file = tmp_path / "half.safetensors"
    save_file(halved, str(file))
    for key, delta in _deltas(load_lora(file, targets=sd15_targets, layout=SD1)).items():
        torch.testing.assert_close(delta, 0.5 * reference[key])
    # SDXL-style kohya files name modules by their LDM path (input_blocks_1_1_...)
    by_ldm = {}
    index = sd15_targets.index
    inverse = {v: k for k, v in index.items() if k[0] == "kohya" and "input_blocks" in k[1] or "middle_block" in k[1] or "output_blocks" in k[1]}
    for key, value in halved.items():
        name, _, role = key.partition(".")
        target = index[("kohya", name)]
        by_ldm[f"{inverse[target][1]}.{role}"] = value
    file = tmp_path / "ldm-names.safetensors"
    save_file(by_ldm, str(file))
    deltas = _deltas(load_lora(file, targets=sd15_targets, layout=SD1))
    assert deltas.keys() == reference.keys()


# ---------------------------------------------------------------- the zoo: application in the merge kernel


def _random_zoo_lora(tmp_path: Path, *, seed: int = 0, rank: int = 2, alpha: float | None = None, conv: bool = False) -> Path:
    """A LoRA for the zoo UNet in PEFT format, written by diffusers' own ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(ZOO / "config" / "unet")))
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + (["conv1"] if conv else [])
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    state = get_peft_model_state_dict(unet)
    out = tmp_path / f"zoo-lora-{seed}"
    metadata = unet.peft_config["default"].to_dict()  # diffusers stores lora_alpha in the file's metadata
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=state, weight_name="lora.safetensors", safe_serialization=True, unet_lora_adapter_metadata=metadata
    )
    return out / "lora.safetensors"


@pytest.fixture(scope="module")
def zoo_parents():
    return load_parents(paths=[paths.model_file(ZOO, "base"), paths.model_file(ZOO, "shape")], dtype="fp32", device="cpu")


def _unet_config() -> dict:
    return json.loads((ZOO / "config" / "unet" / "config.json").read_text())


def test_lora_in_the_merge_kernel_adds_strength_times_update_and_never_accumulates(zoo_parents, tmp_path: Path) -> None:
    bank = zoo_parents.bank
    lora, = load_loras([("r", _random_zoo_lora(tmp_path, alpha=1.0, conv=True))], bank=bank, unet_config=_unet_config())
    assert lora.format == "peft" and {l.scale for l in lora.layers} == {0.5}
    assert any(l.target.endswith("in_layers.2.weight") for l in lora.layers)  # a conv LoRA (resnet conv1)
    merger = Merger(bank, loras=[lora])
    plain = MergeRecipe.uniform(method="weighted_sum", layout=SD1, alpha=0.3)
    merger.merge(plain)
    expected = {k: v.clone() for k, v in merger.state_dict().items()}
    strengths = uniform_strengths([lora], 0.7)
    with_lora = plain.model_copy(update={"loras": strengths})
    for _ in range(2):  # the second merge starts from the parents again
        stats = merger.merge(with_lora)
        assert stats.lora_layers == len(lora.layers)
        got = merger.state_dict()
        targets = {l.target: l for l in lora.layers}
        for key, value in got.items():
            if key in targets:
                l = targets[key]
                update = (0.7 * l.scale * (l.up @ l.down)).view(value.shape)
                torch.testing.assert_close(value, expected[key] + update, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(value, expected[key]), key
    zero = plain.model_copy(update={"loras": uniform_strengths([lora], 0.0)})
    assert merger.merge(zero).lora_layers == 0
    assert all(torch.equal(v, expected[k]) for k, v in merger.state_dict().items())


def test_lora_matches_diffusers_fuse_lora_on_the_zoo_model(tmp_path: Path) -> None:
    """Round trip through diffusers: load_lora_weights + fuse_lora equals evomerge's in-place update."""
    from optimizer.checkpoint.keymap import diffusers_to_ldm
    from optimizer.zoo.build import load_zoo_pipeline

    file = _random_zoo_lora(tmp_path, seed=3, rank=3, alpha=6.0)
    parents = load_parents(paths=[paths.model_file(ZOO, "base"), paths.model_file(ZOO, "base")], dtype="fp32", device="cpu")
    lora, = load_loras([("r", file)], bank=parents.bank, unet_config=_unet_config())
    merger = Merger(parents.bank, loras=[lora])
    merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=SD1, alpha=0.0, ).model_copy(update={"loras": uniform_strengths([lora], 0.8)}))
    ours = merger.state_dict()
    pipe = load_zoo_pipeline("base")
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="r")
    pipe.fuse_lora(lora_scale=0.8, adapter_names=["r"])
    pipe.unload_lora_weights()
    theirs = diffusers_to_ldm(components={"unet": pipe.unet.state_dict()}, architecture="sd1", unet_config=pipe.unet.config)
    changed = 0
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
        changed += key in {l.target for l in lora.layers}
    assert changed == len(lora.layers)


def test_per_block_strengths_touch_only_their_blocks(zoo_parents, tmp_path: Path) -> None:
    bank = zoo_parents.bank
    lora, = load_loras([("r", _random_zoo_lora(tmp_path, seed=1))], bank=bank, unet_config=_unet_config())
    merger = Merger(bank, loras=[lora])
    plain = MergeRecipe.uniform(method="weighted_sum", layout=SD1, alpha=0.5)
    merger.merge(plain)
    base = {k: v.clone() for k, v in merger.state_dict().items()}
    only = "OUT05"
    assert only in lora.blocks
    strengths = {"r": {b: (1.0 if b == only else 0.0) for b in lora.blocks}}
    merger.merge(plain.model_copy(update={"loras": strengths}))
    changed = {SD1.owner_of(k) for k, v in merger.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {only}


def test_two_loras_add_and_lbw_strings_set_their_blocks(zoo_parents, tmp_path: Path) -> None:
    bank = zoo_parents.bank
    a, b = load_loras([("a", _random_zoo_lora(tmp_path, seed=1)), ("b", _random_zoo_lora(tmp_path, seed=2))], bank=bank, unet_config=_unet_config())
    merger = Merger(bank, loras=[a, b])
    plain = MergeRecipe.uniform(method="weighted_sum", layout=SD1, alpha=0.5)
    results = {}
    for name, loras in {"a": {"a": 1.0}, "b": {"b": 1.0}, "ab": {"a": 1.0, "b": 1.0}, "none": {}}.items():
        strengths = {n: dict.fromkeys((a if n == "a" else b).blocks, s) for n, s in loras.items()}
        merger.merge(plain.model_copy(update={"loras": strengths}))
        results[name] = {k: v.clone() for k, v in merger.state_dict().items()}
    for key in results["none"]:
        torch.testing.assert_close(results["ab"][key] - results["none"][key], (results["a"][key] - results["none"][key]) + (results["b"][key] - results["none"][key]), rtol=1e-5, atol=1e-6)
    # the zoo's 4-level UNet has attention in the same SD1 blocks as SD1.5: a 17-value LBW string covers them
    per_block = parse_lbw("OUTALL", layout=SD1, touched=a.blocks, strength=0.5)
    assert per_block["OUT05"] == 0.5 and per_block["IN01"] == 0.0 and set(per_block) == set(a.blocks)


# ---------------------------------------------------------------- LBW


def test_lbw_layouts_and_presets() -> None:
    assert len(lbw_blocks(layout=SD1, kind="lora")) == 17
    assert lbw_blocks(layout=SD1, kind="lycoris") == SD1.blocks
    sdxl = load_layout("sdxl")
    assert len(lbw_blocks(layout=sdxl, kind="lora")) == 12
    assert all(len(v.split(",")) == 17 for v in lbw_presets().values())
    touched = ("IN01", "M00", "OUT11")
    assert parse_lbw("1,0,0,0,0,0,0,0.5,0,0,0,0,0,0,0,0,0.25", layout=SD1, touched=touched) == {"IN01": 0.0, "M00": 0.5, "OUT11": 0.25}
    full = ",".join(["1"] * 26)
    assert parse_lbw(full, layout=SD1, touched=("IN00",), strength=2.0) == {"IN00": 2.0}


@pytest.mark.parametrize(
    ("text", "touched", "message"),
    [
        ("1,1,1", ("IN01",), "has 3 values; sd1 takes 17 (lora) or 26 (lycoris)"),
        ("OUTALL", ("IN00",), "gives no value for block(s) ['IN00']"),
        ("FOO", ("IN01",), "neither a preset"),
        (",".join(["nan"] * 17), ("IN01",), "must be finite"),
    ],
)
def test_lbw_errors(text: str, touched: tuple[str, ...], message: str) -> None:
    with pytest.raises(LoraError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        parse_lbw(text, layout=SD1, touched=touched)


# ---------------------------------------------------------------- bad input


def _pair(prefix: str, rank: int = 2, out: int = 8, inp: int = 8) -> dict[str, torch.Tensor]:
    return {f"{prefix}.lora_down.weight": torch.zeros(rank, inp), f"{prefix}.lora_up.weight": torch.zeros(out, rank)}


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({}, "holds no tensors"),
        ({"lora_unet_x.hada_w1_a": torch.zeros(1)}, "LyCORIS LoHa/LoKr is not supported"),
        ({"lora_unet_x.dora_scale": torch.zeros(1)}, "DoRA is not supported"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 8)}, "has no matching up factor"),
        ({"lora_unet_x.lora_down.weight": torch.zeros(2, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 3)}, "factors do not chain"),
        ({**_pair("lora_unet_x"), "lora_unet_x.alpha": torch.tensor(float("nan"))}, "must be one finite number"),
        ({**_pair("lora_unet_x"), "unet.y.lora_A.weight": torch.zeros(2, 8)}, "mixes kohya and peft"),
        ({"model.weight": torch.zeros(2)}, "no known LoRA format"),
        ({**_pair("lora_unet_x"), "lora_unet_y.alpha": torch.tensor(1.0)}, "an alpha for 'lora_unet_y' has no LoRA factors"),
    ],
)
def test_bad_lora_state_dicts_are_refused_with_the_reason(state: dict, message: str) -> None:
    with pytest.raises(LoraError, match=message):
        parse_lora(state, source="bad.safetensors")


def test_unmapped_modules_and_wrong_shapes_are_errors_that_name_them(zoo_parents, tmp_path: Path) -> None:
    bank = zoo_parents.bank
    file = tmp_path / "x.safetensors"
    save_file(_pair("lora_unet_down_blocks_9_attentions_0_proj_in"), str(file))
    with pytest.raises(LoraError, match=r"1 of 1 LoRA modules do not map onto this sd1 model.*lora_unet_down_blocks_9"):
        load_loras([("x", file)], bank=bank, unet_config=_unet_config())
    save_file(_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", out=320, inp=768), str(file))
    with pytest.raises(LoraError, match=r"makes a 320 x 768 update, but .*attn2.to_k.weight has shape \(32, 64\)"):
        load_loras([("x", file)], bank=bank, unet_config=_unet_config())
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(LoraError, match="unknown LoRA file type '.txt'"):
        load_loras([("x", tmp_path / "x.txt")], bank=bank, unet_config=_unet_config())
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        load_loras([("x", tmp_path / "broken.safetensors")], bank=bank, unet_config=_unet_config())
    with pytest.raises(LoraError, match="no LoRA file at"):
        load_loras([("x", tmp_path / "missing.safetensors")], bank=bank, unet_config=_unet_config())


def test_recipes_naming_unknown_loras_or_lacking_blocks_are_refused_before_the_merge(zoo_parents, tmp_path: Path) -> None:
    bank = zoo_parents.bank
    lora, = load_loras([("r", _random_zoo_lora(tmp_path))], bank=bank, unet_config=_unet_config())
    plain = MergeRecipe.uniform(method="weighted_sum", layout=SD1, alpha=0.5)
    with pytest.raises(RecipeError, match="holds none"):
        Merger(bank).merge(plain.model_copy(update={"loras": {"r": {"IN01": 1.0}}}))
    merger = Merger(bank, loras=[lora])
    before = merger.output.clone()
    with pytest.raises(RecipeError, match="names LoRA 'q'; loaded: r"):
        merger.merge(plain.model_copy(update={"loras": {"q": {}}}))
    with pytest.raises(RecipeError, match="no strength for block"):
        merger.merge(plain.model_copy(update={"loras": {"r": {"IN01": 1.0}}}))
    with pytest.raises(RecipeError, match="must be finite"):
        merger.merge(plain.model_copy(update={"loras": {"r": dict.fromkeys(lora.blocks, float("inf"))}}))
    assert torch.equal(merger.output, before)  # nothing half-written
    with pytest.raises(LoraError, match="unique"):
        LoraSet([lora, lora], views=merger.state_dict())


def test_the_merge_cli_bakes_loras_with_strength_and_lbw(zoo_parents, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from optimizer.cli import app

    lora_file = _random_zoo_lora(tmp_path, seed=9)
    out = tmp_path / "merged.safetensors"
    base, shape = (str(paths.model_file(ZOO, n)) for n in ("base", "shape"))
    result = CliRunner().invoke(app, ["merge", base, shape, "--alpha", "0.5", "--dtype", "fp32", "--device", "cpu",
                                      "--lora", f"{lora_file}:0.7:OUTALL", "-o", str(out)])
    assert result.exit_code == 0, result.output
    bank = zoo_parents.bank
    lora, = load_loras([("lora", lora_file)], bank=bank, unet_config=_unet_config())
    merger = Merger(bank, loras=[lora])
    strengths = {"lora": parse_lbw("OUTALL", layout=SD1, touched=lora.blocks, strength=0.7)}
    merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=SD1, alpha=0.5).model_copy(update={"loras": strengths}))
    saved = load_file(str(out))
    assert all(torch.equal(saved[k], v) for k, v in merger.state_dict().items())
    bad = CliRunner().invoke(app, ["merge", base, shape, "--alpha", "0.5", "--lora", str(tmp_path / "none.safetensors"), "-o", str(tmp_path / "x.safetensors")])
    assert bad.exit_code != 0 and "no LoRA file at" in bad.output and not (tmp_path / "x.safetensors").exists()
