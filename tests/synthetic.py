"""Synthetic state dicts with real LDM key names (a few keys per block), for fast unit tests."""

from __future__ import annotations

import torch


def sd1_keys(*, text: str = "cond_stage_model.transformer.text_model.") -> list[str]:
    """One or more SD1 LDM keys for every one of the 26 blocks, plus a VAE key."""
    unet = "model.diffusion_model."
    keys = [f"{unet}time_embed.0.weight", f"{unet}out.2.weight", f"{unet}middle_block.1.proj_in.weight"]
    keys += [f"{unet}input_blocks.{i}.0.weight" for i in range(12)]
    keys += [f"{unet}output_blocks.{i}.0.weight" for i in range(12)]
    keys += ["first_stage_model.decoder.conv_in.weight", f"{text}final_layer_norm.weight"]
    return keys


def zeros_state_dict(keys: list[str], *, width: int = 4) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(width, width) for k in keys}


def random_sd1_state_dict(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(3, 5, generator=gen).to(dtype) for k in sd1_keys()}
