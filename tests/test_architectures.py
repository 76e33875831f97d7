"""Block layouts as data, MBW strings and architecture detection."""

from __future__ import annotations

import pytest
import torch

from optimizer.architectures import (
    ArchitectureError,
    LayoutError,
    MBWError,
    available_layouts,
    check_compatible,
    detect_architecture,
    format_mbw,
    load_layout,
    parse_layout,
    parse_mbw,
)
from tests.synthetic import sd1_keys as _sd1_keys
from tests.synthetic import zeros_state_dict as _sd

SD1_BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
SDXL_BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]


def test_shipped_layouts_load_and_have_the_mbw_block_orders() -> None:
    assert available_layouts() == ["flux", "sd1", "sd2", "sd3", "sd35_large", "sdxl"]
    assert list(load_layout("sd1").blocks) == SD1_BLOCKS
    assert list(load_layout("sd2").blocks) == SD1_BLOCKS
    assert list(load_layout("sdxl").blocks) == SDXL_BLOCKS
    for name in ("sd1", "sd2", "sdxl"):
        assert load_layout(name).components == ("VAE",)
    for name in ("flux", "sd3", "sd35_large"):
        assert load_layout(name).components == ("VAE", "TE")


@pytest.mark.parametrize(
    ("key", "block"),
    [
        ("model.diffusion_model.time_embed.0.weight", "IN00"),
        ("model.diffusion_model.input_blocks.0.0.weight", "IN00"),
        ("model.diffusion_model.input_blocks.11.0.out_layers.3.bias", "IN11"),
        ("model.diffusion_model.middle_block.2.in_layers.0.weight", "M00"),
        ("model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "OUT04"),
        ("model.diffusion_model.out.0.weight", "OUT11"),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
        ("first_stage_model.encoder.conv_in.weight", "VAE"),
    ],
)
def test_sd1_key_owners_follow_the_documented_convention(key: str, block: str) -> None:
    assert load_layout("sd1").owner_of(key) == block


@pytest.mark.parametrize(
    ("key", "block"),
    [
        ("model.diffusion_model.label_emb.0.0.weight", "IN00"),
        ("model.diffusion_model.time_embed.2.bias", "IN00"),
        ("model.diffusion_model.input_blocks.8.0.skip_connection.weight", "IN08"),
        ("model.diffusion_model.out.2.weight", "OUT08"),
        ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "BASE"),
        ("conditioner.embedders.1.model.text_projection", "BASE"),
    ],
)
def test_sdxl_key_owners(key: str, block: str) -> None:
    assert load_layout("sdxl").owner_of(key) == block


def test_unowned_and_out_of_range_keys_are_errors_naming_the_key() -> None:
    layout = load_layout("sd1")
    with pytest.raises(LayoutError, match="no block owns key 'model.diffusion_model.extra.weight'"):
        layout.owner_of("model.diffusion_model.extra.weight")
    with pytest.raises(LayoutError, match="IN12"):
        layout.owner_of("model.diffusion_model.input_blocks.12.0.weight")


LAYOUT_TEMPLATE = """
name: test
title: Test
diffusers_config: sd15
pipeline: StableDiffusionPipeline
blocks: [A, B]
rules:
{rules}
identify: {{all: []}}
"""


def test_layout_with_overlapping_rules_rejects_a_doubly_owned_key() -> None:
    layout = parse_layout(LAYOUT_TEMPLATE.format(rules="  - {match: 'x\\.', block: A}\n  - {match: 'x\\.y', block: B}"))
    assert layout.owner_of("x.z") == "A"
    with pytest.raises(LayoutError, match="owned by several rules"):
        layout.assign(["x.y.weight"])


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("  - {match: 'x', block: C}", "unknown block 'C'"),
        ("  - {match: '(', block: A}", "invalid regular expression"),
        ("  - {match: 'x', block: A, weight: 2}", "rules.0.weight"),
    ],
)
def test_invalid_layout_files_name_the_field(rules: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        parse_layout(LAYOUT_TEMPLATE.format(rules=rules), source="bad.yaml")


def test_duplicate_blocks_are_rejected() -> None:
    with pytest.raises(LayoutError, match="blocks listed twice"):
        parse_layout(LAYOUT_TEMPLATE.replace("[A, B]", "[A, A]").format(rules="  - {match: 'x', block: A}"))


def test_unknown_architecture_name() -> None:
    with pytest.raises(LayoutError, match="unknown architecture 'sd4'"):
        load_layout("sd4")


def test_mbw_round_trip_is_verbatim() -> None:
    layout = load_layout("sd1")
    text = "1,0.5,0.25,0,0,0,0,0,0,0,0,0,0,0.3,0,0,0,0,0,0,0,0,0,0,0,1"
    weights = parse_mbw(text, layout=layout)
    assert weights["BASE"] == 1.0 and weights["IN01"] == 0.25 and weights["M00"] == 0.3 and weights["OUT11"] == 1.0
    assert format_mbw(weights, layout=layout) == text
    spaced = "1 0.5 0.25 0 0 0 0 0 0 0 0 0 0 0.3 0 0 0 0 0 0 0 0 0 0 0 1"
    assert parse_mbw(spaced, layout=layout) == weights


def test_sdxl_mbw_and_the_supermerger_mapping_of_a_26_value_string() -> None:
    layout = load_layout("sdxl")
    values = [str(i) for i in range(26)]
    with pytest.raises(MBWError, match="takes 20 MBW values"):
        parse_mbw(",".join(values), layout=layout)
    mapped = parse_mbw(",".join(values), layout=layout, sd1_string_for_sdxl=True)
    # BASE, then w[:9] + w[12:22] of the 25 UNet values (values 1..25)
    assert list(mapped.values()) == [0.0, *range(1, 10), *range(13, 23)]


@pytest.mark.parametrize("text", ["0.5,nan" + ",0" * 24, "0.5,x" + ",0" * 24, "0.5,0.5"])
def test_bad_mbw_strings(text: str) -> None:
    with pytest.raises(MBWError):
        parse_mbw(text, layout=load_layout("sd1"))


def test_detects_sd1_sd2_sdxl() -> None:
    assert detect_architecture(_sd(_sd1_keys())).name == "sd1"
    assert detect_architecture(_sd(_sd1_keys(text="cond_stage_model.model.transformer."))).name == "sd2"
    unet = "model.diffusion_model."
    sdxl = [f"{unet}label_emb.0.0.weight", f"{unet}time_embed.0.weight", f"{unet}out.2.weight"]
    sdxl += [f"{unet}input_blocks.{i}.0.weight" for i in range(9)] + [f"{unet}output_blocks.{i}.0.weight" for i in range(9)]
    sdxl += ["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.y"]
    assert detect_architecture(_sd(sdxl)).name == "sdxl"


def test_unet_only_files_are_told_apart_by_cross_attention_width() -> None:
    keys = [k for k in _sd1_keys() if k.startswith("model.")]
    cross = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd = _sd(keys)
    sd[cross] = torch.zeros(320, 1024)
    assert detect_architecture(sd).name == "sd2"
    sd[cross] = torch.zeros(320, 768)
    assert detect_architecture(sd).name == "sd1"


def test_mixed_and_foreign_keys_are_clear_errors() -> None:
    mixed = _sd(_sd1_keys() + ["model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.0.x"])
    with pytest.raises(ArchitectureError, match="match no known architecture"):
        detect_architecture(mixed, source="mixed.safetensors")
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1)}
    with pytest.raises(ArchitectureError, match="no denoiser keys"):
        detect_architecture(lora)


def test_check_compatible_names_the_mismatch() -> None:
    a = _sd(_sd1_keys())
    b = _sd(_sd1_keys())
    assert check_compatible([a, b], names=["a", "b"]).name == "sd1"
    b["model.diffusion_model.out.2.weight"] = torch.zeros(8, 4)
    with pytest.raises(ArchitectureError, match=r"shape mismatch at model.diffusion_model.out.2.weight: a has \(4, 4\), b has \(8, 4\)"):
        check_compatible([a, b], names=["a", "b"])
    c = _sd(_sd1_keys(text="cond_stage_model.model.transformer."))
    with pytest.raises(ArchitectureError, match=r"cannot merge a \(sd1\) with c \(sd2\)"):
        check_compatible([a, c], names=["a", "c"])
