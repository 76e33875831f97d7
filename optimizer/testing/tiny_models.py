"""Tiny, real-topology Stable Diffusion models for tests, the merge demo and benchmarks.

The models are built with the diffusers / transformers classes themselves, seeded and
deterministic, and take well under a second each to build on CPU:

* SD1: UNet2DConditionModel with the SD1 block structure (4 levels, CrossAttnDownBlock2D x3 +
  DownBlock2D, ``layers_per_block=2``, conv ``proj_in``), a 4-level AutoencoderKL and an HF
  CLIPTextModel (quick_gelu) with the real vocabulary size (49408) and 77 positions.
* SD2: the same UNet with linear projections and per-level head counts, and an OpenCLIP-style
  text encoder (CLIPTextModel with gelu), stored in LDM files in OpenCLIP format.
* SDXL: UNet2DConditionModel with the SDXL structure (3 levels DownBlock2D, CrossAttnDownBlock2D
  x2, transformer depth per level, ``text_time`` addition embedding), CLIPTextModel +
  CLIPTextModelWithProjection (different widths, as diffusers' single-file loader tells the two
  towers apart by width).

Writers produce an LDM single file (:func:`write_tiny_ldm`), a diffusers folder saved by the
diffusers pipeline itself (:func:`write_tiny_diffusers`) and a matching offline config folder
(:func:`tiny_config_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from optimizer.checkpoint.config_dir import diffusers_config_dir
from optimizer.checkpoint.keymap import diffusers_to_ldm

__all__ = [
    "CONFIG_NAME",
    "component_state_dicts",
    "tiny_config_dir",
    "tiny_ldm_state_dict",
    "tiny_sd1_components",
    "tiny_sd2_components",
    "tiny_sdxl_components",
    "write_tiny_diffusers",
    "write_tiny_ldm",
]

#: architecture -> shipped diffusers config name
CONFIG_NAME = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}

_VOCAB = 49408
_POSITIONS = 77


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # x2, x2, x1 like SD's 128, 256, 512, 512
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _clip_config(*, hidden: int, act: str, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=_POSITIONS,
        hidden_act=act,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )


def _sd_unet(*, cross_attention_dim: int, linear: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 64, 64),  # x2, x2, x1 like SD's 320, 640, 1280, 1280
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 4, 4) if linear else 8,
        use_linear_projection=linear,
        upcast_attention=linear,
    )


def _tiny_sd_components(*, seed: int, width: int, act: str, linear: bool) -> dict[str, torch.nn.Module]:
    """An SD1/SD2-topology model: a ``width``-wide CLIP text tower (``act``) and a UNet with
    linear (SD2) or conv (SD1) transformer projections."""
    from transformers import CLIPTextModel

    _seeded(seed)
    text_encoder = CLIPTextModel(_clip_config(hidden=width, act=act, projection=width))
    unet = _sd_unet(cross_attention_dim=width, linear=linear)
    vae = _tiny_vae()
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def tiny_sd1_components(seed: int = 0) -> dict[str, torch.nn.Module]:
    """``{"unet", "vae", "text_encoder"}`` of a tiny SD1-topology model (eval mode, float32)."""
    return _tiny_sd_components(seed=seed, width=32, act="quick_gelu", linear=False)


def tiny_sd2_components(seed: int = 0) -> dict[str, torch.nn.Module]:
    """``{"unet", "vae", "text_encoder"}`` of a tiny SD2-topology model (OpenCLIP-style text tower)."""
    return _tiny_sd_components(seed=seed, width=48, act="gelu", linear=True)


def tiny_sdxl_components(seed: int = 0) -> dict[str, torch.nn.Module]:
    """``{"unet", "vae", "text_encoder", "text_encoder_2"}`` of a tiny SDXL-topology model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _seeded(seed)
    text_encoder = CLIPTextModel(_clip_config(hidden=32, act="quick_gelu", projection=32))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(hidden=64, act="gelu", projection=32))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),  # x2, x2 like SDXL's 320, 640, 1280
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),
        norm_num_groups=8,
        cross_attention_dim=32 + 64,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled text (text_encoder_2 projection) + 6 time ids, as the SDXL pipeline builds them
        projection_class_embeddings_input_dim=32 + 6 * time_dim,
    )
    vae = _tiny_vae()
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
    }


def component_state_dicts(components: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: module.state_dict()}``."""
    return {name: module.state_dict() for name, module in components.items()}


def tiny_ldm_state_dict(components: dict[str, torch.nn.Module], architecture: str) -> dict[str, torch.Tensor]:
    """The LDM-named state dict of ``components`` (via ``diffusers_to_ldm``)."""
    return diffusers_to_ldm(
        components=component_state_dicts(components),
        architecture=architecture,
        unet_config=dict(components["unet"].config),
        vae_config=dict(components["vae"].config) if "vae" in components else None,
    )


def write_tiny_ldm(path: str | Path, components: dict[str, torch.nn.Module], architecture: str) -> Path:
    """Write ``components`` as an LDM single-file safetensors at ``path``; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    state_dict = {k: v.detach().contiguous() for k, v in tiny_ldm_state_dict(components, architecture).items()}
    save_file(state_dict, str(path), metadata={"format": "pt"})
    return path


def tiny_config_dir(components: dict[str, torch.nn.Module], architecture: str) -> Path:
    """An offline diffusers config folder whose component configs match ``components``."""
    import diffusers

    # the version that made the models: pipelines "fix" small sample sizes of pre-0.9 configs
    overrides: dict[str, Any] = {"unet_config": {**components["unet"].config, "_diffusers_version": diffusers.__version__}}
    if "vae" in components:
        overrides["vae_config"] = dict(components["vae"].config)
    if "text_encoder" in components:
        overrides["text_encoder_config"] = components["text_encoder"].config.to_diff_dict()
    if "text_encoder_2" in components:
        overrides["text_encoder_2_config"] = components["text_encoder_2"].config.to_diff_dict()
    return diffusers_config_dir(CONFIG_NAME[architecture], **overrides)


def write_tiny_diffusers(
    path: str | Path, components: dict[str, torch.nn.Module], architecture: str, *, variant: str | None = None
) -> Path:
    """Save ``components`` as a diffusers folder with the diffusers pipeline's own ``save_pretrained``.

    Tokenizers and scheduler come from :func:`tiny_config_dir`; ``variant="fp16"`` writes
    ``*.fp16.safetensors`` weight files (in float16).
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    config = tiny_config_dir(components, architecture)
    modules = dict(components)
    if variant == "fp16":
        import copy

        modules = {k: copy.deepcopy(m).to(torch.float16) for k, m in modules.items()}
    if architecture == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=modules["vae"],
            text_encoder=modules["text_encoder"],
            text_encoder_2=modules["text_encoder_2"],
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(config / "tokenizer_2"),
            unet=modules["unet"],
            scheduler=EulerDiscreteScheduler.from_pretrained(config / "scheduler"),
        )
    else:
        scheduler_cls = DDIMScheduler if architecture == "sd2" else PNDMScheduler
        pipe = StableDiffusionPipeline(
            vae=modules["vae"],
            text_encoder=modules["text_encoder"],
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            unet=modules["unet"],
            scheduler=scheduler_cls.from_pretrained(config / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True, variant=variant)
    return path
