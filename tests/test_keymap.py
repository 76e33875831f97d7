"""diffusers <-> LDM key mapping, offline config folders and diffusers folders (tiny real-topology models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from optimizer.architectures import detect_architecture, load_layout
from optimizer.checkpoint.config_dir import CONFIG_NAMES, diffusers_config_dir
from optimizer.checkpoint.diffusers_folder import read_diffusers_folder, write_diffusers_folder
from optimizer.checkpoint.keymap import COMPONENT_PREFIXES, diffusers_to_ldm
from optimizer.checkpoint.keymap_diffusers import empty_model, ldm_to_diffusers, load_component_configs
from optimizer.checkpoint.types import CheckpointError
from optimizer.errors import EvomergeError
from optimizer.testing.tiny_models import (
    CONFIG_NAME,
    component_state_dicts,
    tiny_config_dir,
    tiny_ldm_state_dict,
    tiny_sd1_components,
    tiny_sd2_components,
    tiny_sdxl_components,
    write_tiny_diffusers,
    write_tiny_ldm,
)

ARCHS = ("sd1", "sd2", "sdxl")
BUILDERS = {"sd1": tiny_sd1_components, "sd2": tiny_sd2_components, "sdxl": tiny_sdxl_components}


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_CACHE", str(tmp_path_factory.mktemp("evomerge-cache")))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tiny():
    """``arch -> (modules, diffusers state dicts, LDM state dict, config dir)``, built once."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            modules = BUILDERS[arch](seed=0)
            sds = component_state_dicts(modules)
            ldm = diffusers_to_ldm(
                components=sds,
                architecture=arch,
                unet_config=dict(modules["unet"].config),
                vae_config=dict(modules["vae"].config),
            )
            _assert_same(ldm, tiny_ldm_state_dict(modules, arch), "tiny_ldm_state_dict")
            cache[arch] = (modules, sds, ldm, tiny_config_dir(modules, arch))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def full():
    """``arch -> (meta-device diffusers state dicts, LDM state dict, config dir)`` at real size."""
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            config_dir = diffusers_config_dir(CONFIG_NAME[arch])
            configs = load_component_configs(config_dir)
            sds = {c: empty_model(c, configs[c]).state_dict() for c in COMPONENT_PREFIXES[arch]}
            ldm = diffusers_to_ldm(components=sds, architecture=arch, unet_config=configs["unet"], vae_config=configs["vae"])
            cache[arch] = (sds, ldm, config_dir)
        return cache[arch]

    return get


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), f"{what}: key sets differ: {sorted(set(got) ^ set(want))[:5]}"
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: tensors differ at {bad[:5]}"


def _pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


# ---------------------------------------------------------------------------------------------
# round trips and key names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_diffusers_ldm_diffusers_is_exact(tiny, arch):
    _, sds, ldm, config_dir = tiny(arch)
    back = ldm_to_diffusers(state_dict=ldm, architecture=arch, config_dir=config_dir)
    assert set(back) == set(sds)
    for component, sd in sds.items():
        assert list(back[component]) == list(sd), component  # same keys, model order
        _assert_same(back[component], sd, component)
    # renames pass the very tensors through: the whole UNet, both ways
    unet_ldm = {k for k in ldm if k.startswith("model.diffusion_model.")}
    assert {id(ldm[k]) for k in unet_ldm} == {id(t) for t in sds["unet"].values()}
    assert all(back["unet"][k] is sds["unet"][k] for k in sds["unet"])
    # the VAE attention reshape is a view, not a copy
    q = sds["vae"]["encoder.mid_block.attentions.0.to_q.weight"]
    q_ldm = ldm["first_stage_model.encoder.mid.attn_1.q.weight"]
    assert q_ldm.shape == (*q.shape, 1, 1) and q_ldm.data_ptr() == q.data_ptr()


@pytest.mark.parametrize("arch", ARCHS)
def test_ldm_keys_belong_to_exactly_one_block_and_detect(tiny, full, arch):
    for ldm in (tiny(arch)[2], full(arch)[1]):
        assignment = load_layout(arch).assign(ldm)  # raises unless every key has exactly one owner
        assert set(assignment.owner) == set(ldm)
        assert detect_architecture(ldm).name == arch
        assert assignment.keys_of("VAE") == [k for k in ldm if k.startswith("first_stage_model.")]


def test_sd1_tiny_keys_are_real_sd15_key_names(tiny, full):
    ldm = tiny("sd1")[2]
    for key in (
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in ldm, key
    assert ldm["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 4  # SD1: conv proj_in
    # same topology as SD1.5: exactly the real UNet and VAE key sets
    full_ldm = full("sd1")[1]
    for prefix in ("model.diffusion_model.", "first_stage_model."):
        assert {k for k in ldm if k.startswith(prefix)} == {k for k in full_ldm if k.startswith(prefix)}, prefix


def test_sd2_and_sdxl_tiny_keys_are_real_key_names(tiny, full):
    sd2, sd2_full = tiny("sd2")[2], full("sd2")[1]
    assert {k for k in sd2 if k.startswith("model.")} == {k for k in sd2_full if k.startswith("model.")}
    assert sd2["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 2  # linear proj_in
    layer = "cond_stage_model.model.transformer.resblocks.1.attn."
    assert sd2[layer + "in_proj_weight"].shape == (3 * 48, 48) and sd2[layer + "in_proj_bias"].shape == (3 * 48,)
    # tiny SDXL has smaller transformer depths: its keys are a subset of the real ones
    xl, xl_full = tiny("sdxl")[2], full("sdxl")[1]
    assert set(xl) <= set(xl_full), sorted(set(xl) - set(xl_full))[:5]
    assert xl["conditioner.embedders.1.model.text_projection"].shape == (64, 32)  # [width, projection]
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in xl  # upsampler after attention


def test_full_size_models_map_to_real_key_counts_and_shapes(full):
    sds, ldm, _ = full("sd1")
    assert sum(t.numel() for t in sds["unet"].values()) == 859_520_964
    assert len([k for k in ldm if k.startswith("model.diffusion_model.")]) == 686
    assert len([k for k in ldm if k.startswith("first_stage_model.")]) == 248
    assert len([k for k in ldm if k.startswith("cond_stage_model.transformer.")]) == 196
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ldm["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)

    sds, ldm, _ = full("sd2")
    assert len([k for k in ldm if k.startswith("model.diffusion_model.")]) == 686
    assert ldm["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
    assert ldm["cond_stage_model.model.positional_embedding"].shape == (77, 1024)
    assert len([k for k in ldm if k.startswith("cond_stage_model.model.")]) == 4 + 23 * 12

    sds, ldm, _ = full("sdxl")
    assert sum(t.numel() for t in sds["unet"].values()) == 2_567_463_684
    assert len([k for k in ldm if k.startswith("model.diffusion_model.")]) == 1680
    assert ldm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert ldm["model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert ldm["model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight"].shape == (1280, 5120)
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert ldm["conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight"].shape == (5120, 1280)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight" in ldm


@pytest.mark.parametrize("arch", ARCHS)
def test_full_size_roundtrip_on_meta(full, arch):
    sds, ldm, config_dir = full(arch)
    back = ldm_to_diffusers(state_dict=ldm, architecture=arch, config_dir=config_dir)
    for component, sd in sds.items():
        assert list(back[component]) == list(sd)
        assert all(back[component][k].shape == sd[k].shape for k in sd), component


def test_real_checkpoint_extras_are_dropped(tiny):
    """Keys real LDM files carry that diffusers has no place for: position_ids, logit_scale, SD2's
    last OpenCLIP layer and text_projection, schedule buffers."""
    _, sds, ldm, config_dir = tiny("sd2")
    extra = dict(ldm)
    for key, value in list(ldm.items()):
        if key.startswith("cond_stage_model.model.transformer.resblocks.1."):
            extra[key.replace("resblocks.1.", "resblocks.2.")] = value.clone()
    extra["cond_stage_model.model.text_projection"] = torch.zeros(48, 48)
    extra["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    extra["alphas_cumprod"] = torch.ones(1000)
    back = ldm_to_diffusers(state_dict=extra, architecture="sd2", config_dir=config_dir)
    _assert_same(back["text_encoder"], sds["text_encoder"], "text_encoder")

    _, sds, ldm, config_dir = tiny("sd1")
    extra = {**ldm, "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    back = ldm_to_diffusers(state_dict=extra, architecture="sd1", config_dir=config_dir)
    _assert_same(back["text_encoder"], sds["text_encoder"], "text_encoder")


# ---------------------------------------------------------------------------------------------
# loading through diffusers itself, offline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_ldm_single_file_loads_with_from_single_file(tiny, tmp_path, arch):
    modules, sds, _, config_dir = tiny(arch)
    path = write_tiny_ldm(tmp_path / f"{arch}.safetensors", modules, arch)
    pipe = _pipeline_class(arch).from_single_file(str(path), config=str(config_dir), local_files_only=True)
    for component, sd in sds.items():
        _assert_same(getattr(pipe, component).state_dict(), sd, component)


@pytest.mark.parametrize("arch", ARCHS)
def test_write_diffusers_folder_loads_with_from_pretrained_and_reads_back(tiny, tmp_path, arch):
    _, sds, ldm, config_dir = tiny(arch)
    out = write_diffusers_folder(state_dict=ldm, architecture=arch, path=tmp_path / "model", config_dir=config_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folder left
    pipe = _pipeline_class(arch).from_pretrained(str(out), local_files_only=True)
    for component, sd in sds.items():
        _assert_same(getattr(pipe, component).state_dict(), sd, component)
    state_dict, architecture, configs = read_diffusers_folder(out)
    assert architecture == arch
    assert configs["unet"]["block_out_channels"] == list(pipe.unet.config.block_out_channels)
    _assert_same(state_dict, ldm, "read back")


def test_tiny_sdxl_pipeline_runs(tiny, tmp_path):
    """The tiny SDXL configs are consistent (pooled text + time ids width, cross-attention width)."""
    modules, _, ldm, config_dir = tiny("sdxl")
    out = write_diffusers_folder(state_dict=ldm, architecture="sdxl", path=tmp_path / "xl", config_dir=config_dir)
    pipe = _pipeline_class("sdxl").from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=1, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_read_folders_saved_by_diffusers(tiny, tmp_path, arch):
    modules, _, ldm, _ = tiny(arch)
    path = write_tiny_diffusers(tmp_path / "lib", modules, arch)
    state_dict, architecture, _ = read_diffusers_folder(path)
    assert architecture == arch
    _assert_same(state_dict, ldm, "diffusers-saved folder")
    fp16 = write_tiny_diffusers(tmp_path / "fp16", modules, arch, variant="fp16")
    assert (fp16 / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    state_dict, architecture, _ = read_diffusers_folder(fp16)
    assert architecture == arch
    _assert_same(state_dict, {k: v.half() for k, v in ldm.items()}, "fp16 variant")


def test_read_diffusers_folder_bin_weights_only_safely(tiny, tmp_path):
    modules, sds, ldm, _ = tiny("sd2")
    path = write_tiny_diffusers(tmp_path / "bin", modules, "sd2")
    for component, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "pytorch_model")):
        folder = path / component
        safetensors_file = next(folder.glob("*.safetensors"))
        safetensors_file.unlink()
        torch.save(sds[component], folder / f"{stem}.bin")
    state_dict, architecture, _ = read_diffusers_folder(path)
    assert architecture == "sd2"
    _assert_same(state_dict, ldm, ".bin folder")
    # a pickle that is more than tensors is refused, with the file named
    torch.save({"evil": object()}, path / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin"):
        read_diffusers_folder(path)


# ---------------------------------------------------------------------------------------------
# config folders and tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_from_generated_vocab():
    from transformers import CLIPTokenizer

    path = diffusers_config_dir("sd15")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77
    padded = CLIPTokenizer.from_pretrained(diffusers_config_dir("sdxl") / "tokenizer_2")("cat", padding="max_length").input_ids
    assert padded[:4] == [49406, 2368, 49407, 0] and len(padded) == 77  # OpenCLIP pads with "!" (id 0)


def test_config_dir_is_complete_cached_and_atomic(tmp_path):
    root = tmp_path / "cfg"
    first = diffusers_config_dir("sdxl", cache_dir=root)
    for rel in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
                "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "tokenizer_2/vocab.json"):
        assert (first / rel).is_file(), rel
    index = json.loads((first / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    mtime = (first / "unet" / "config.json").stat().st_mtime_ns
    assert diffusers_config_dir("sdxl", cache_dir=root) == first
    assert (first / "unet" / "config.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    tiny_unet = {"block_out_channels": [32, 64, 64], "_use_default_values": ["x"]}
    other = diffusers_config_dir("sdxl", unet_config=tiny_unet, cache_dir=root)
    assert other != first and other.name.startswith("sdxl-")
    unet = json.loads((other / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [32, 64, 64] and unet["cross_attention_dim"] == 2048
    assert "_use_default_values" not in unet
    # a damaged folder (stamp no longer matching) is rebuilt
    (first / "unet" / "config.json").unlink()
    (first / ".evomerge-config-stamp").write_text("stale")
    assert diffusers_config_dir("sdxl", cache_dir=root) == first and (first / "unet" / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, other.name])  # no temp leftovers
    with pytest.raises(ValueError, match="unknown diffusers config"):
        diffusers_config_dir("sd3", cache_dir=root)
    from optimizer.architectures.layout import available_layouts

    records = [load_layout(a).spec for a in available_layouts()]
    named = {r.diffusers_config for r in records} | {v.diffusers_config for r in records for v in r.variants if v.diffusers_config}
    assert set(CONFIG_NAMES) == named


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_diffusers_key_is_named(tiny):
    modules, sds, _, _ = tiny("sd1")
    unet_config = dict(modules["unet"].config)
    vae_config = dict(modules["vae"].config)
    cases = [
        ("unet", "down_blocks.0.resnets.0.bogus.weight"),
        ("unet", "down_blocks.7.resnets.0.norm1.weight"),  # level out of range
        ("unet", "down_blocks.3.attentions.0.norm.weight"),  # attention where the config has none
        ("unet", "encoder_hid_proj.weight"),
        ("vae", "decoder.up_blocks.0.attentions.0.to_q.weight"),
        ("vae", "decoder.up_blocks.3.upsamplers.0.conv.weight"),  # the last level has no upsampler
        ("text_encoder", "text_model.encoder.layers.0.self_attn.qkv.weight"),
        ("text_encoder", "text_projection.weight"),  # SD1's CLIP-L stores no projection
    ]
    for component, key in cases:
        components = {component: {**sds[component], key: torch.zeros(1)}}
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            diffusers_to_ldm(components=components, architecture="sd1", unet_config=unet_config, vae_config=vae_config)


def test_bad_inputs_raise_checkpoint_errors(tiny):
    modules, sds, ldm, config_dir = tiny("sdxl")
    unet_config = dict(modules["unet"].config)
    with pytest.raises(CheckpointError, match="unknown architecture"):
        diffusers_to_ldm(components={}, architecture="sd3", unet_config=unet_config)
    with pytest.raises(CheckpointError, match="text_encoder_3"):
        diffusers_to_ldm(components={"text_encoder_3": {}}, architecture="sdxl")
    with pytest.raises(CheckpointError, match="unet_config is required"):
        diffusers_to_ldm(components={"unet": sds["unet"]}, architecture="sdxl")
    incomplete = {k: v for k, v in sds["text_encoder_2"].items() if "layers.1.self_attn.v_proj.weight" not in k}
    with pytest.raises(CheckpointError, match=r"missing 'text_model\.encoder\.layers\.1\.self_attn\.v_proj\.weight'"):
        diffusers_to_ldm(components={"text_encoder_2": incomplete}, architecture="sdxl")
    flat = {k.removeprefix("text_model."): v for k, v in sds["text_encoder"].items()}
    with pytest.raises(CheckpointError, match="same parameter"):
        diffusers_to_ldm(components={"text_encoder": {**flat, **{"text_model." + k: v for k, v in flat.items()}}}, architecture="sdxl")

    key = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(CheckpointError, match=f"missing key '{key}'"):
        ldm_to_diffusers(state_dict={k: v for k, v in ldm.items() if k != key}, architecture="sdxl", config_dir=config_dir)
    with pytest.raises(CheckpointError, match=f"{key}' has shape"):
        ldm_to_diffusers(state_dict={**ldm, key: torch.zeros(3, 3)}, architecture="sdxl", config_dir=config_dir)
    bogus = "model.diffusion_model.input_blocks.4.7.weight"
    with pytest.raises(CheckpointError, match=f"unexpected key '{bogus}'"):
        ldm_to_diffusers(state_dict={**ldm, bogus: torch.zeros(1)}, architecture="sdxl", config_dir=config_dir)
    with pytest.raises(CheckpointError, match="cond_stage_model.transformer.text_model.x"):
        ldm_to_diffusers(state_dict={**ldm, "cond_stage_model.transformer.text_model.x": torch.zeros(1)},
                         architecture="sdxl", config_dir=config_dir)
    with pytest.raises(CheckpointError, match="no sdxl model weights"):
        ldm_to_diffusers(state_dict={"alphas_cumprod": torch.ones(3)}, architecture="sdxl", config_dir=config_dir)


def test_write_diffusers_folder_leaves_nothing_behind_on_error(tiny, tmp_path):
    _, _, ldm, config_dir = tiny("sd1")
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match="no vae"):
        write_diffusers_folder(state_dict=no_vae, architecture="sd1", path=tmp_path / "out", config_dir=config_dir)
    assert list(tmp_path.iterdir()) == []
    # fails while writing weights (a tensor without data): the temp folder is removed
    key = "model.diffusion_model.out.2.weight"
    broken = {**ldm, key: torch.empty(ldm[key].shape, device="meta")}
    with pytest.raises(CheckpointError, match="cannot write unet weights"):
        write_diffusers_folder(state_dict=broken, architecture="sd1", path=tmp_path / "out", config_dir=config_dir)
    assert list(tmp_path.iterdir()) == []
    # an existing folder is kept unless overwrite=True, and survives a failed overwrite
    out = write_diffusers_folder(state_dict=ldm, architecture="sd1", path=tmp_path / "out", config_dir=config_dir)
    with pytest.raises(EvomergeError, match="already exists"):
        write_diffusers_folder(state_dict=ldm, architecture="sd1", path=out, config_dir=config_dir)
    with pytest.raises(CheckpointError):
        write_diffusers_folder(state_dict=broken, architecture="sd1", path=out, config_dir=config_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    _assert_same(read_diffusers_folder(out)[0], ldm, "kept folder")
    write_diffusers_folder(state_dict=ldm, architecture="sd1", path=out, config_dir=config_dir, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
