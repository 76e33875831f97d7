"""Synthetic SD1 state dicts for tests: real LDM key names, tiny random tensors.

Every one of the 26 SD1 MBW blocks gets a few keys, plus two VAE keys and the int64
``position_ids`` of the text encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor

_UNET = "model.diffusion_model."
_TEXT = "cond_stage_model.transformer.text_model."

POSITION_IDS_KEY = _TEXT + "embeddings.position_ids"
VAE_KEYS = ("first_stage_model.decoder.conv_in.weight", "first_stage_model.encoder.conv_out.bias")


def sd1_synthetic_shapes() -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` covering all 26 SD1 blocks (in a non-MBW order, to exercise regrouping)."""
    shapes: dict[str, tuple[int, ...]] = {
        _TEXT + "embeddings.token_embedding.weight": (16, 8),
        POSITION_IDS_KEY: (1, 77),
        _TEXT + "encoder.layers.0.self_attn.q_proj.weight": (8, 8),
        _TEXT + "final_layer_norm.bias": (8,),
        VAE_KEYS[0]: (4, 3, 3, 3),
        _UNET + "out.2.weight": (4, 6, 3, 3),
        _UNET + "time_embed.0.weight": (12, 6),
        _UNET + "input_blocks.0.0.weight": (6, 4, 3, 3),
        _UNET + "input_blocks.0.0.bias": (6,),
        _UNET + "middle_block.1.proj_in.weight": (6, 6, 1, 1),
        _UNET + "middle_block.0.in_layers.2.bias": (6,),
    }
    for i in range(1, 12):
        shapes[_UNET + f"input_blocks.{i}.0.in_layers.2.weight"] = (6, 6, 3, 3)
        shapes[_UNET + f"input_blocks.{i}.0.in_layers.2.bias"] = (6,)
        if i % 3 != 0:
            shapes[_UNET + f"input_blocks.{i}.1.proj_in.weight"] = (6, 6)
    for i in range(12):
        shapes[_UNET + f"output_blocks.{i}.0.out_layers.3.weight"] = (6, 6, 3, 3)
        shapes[_UNET + f"output_blocks.{i}.0.skip_connection.bias"] = (6,)
    shapes[VAE_KEYS[1]] = (5,)
    return shapes


def synthetic_state_dicts(*, n: int, dtype: torch.dtype = torch.float32, seed: int = 0, delta_scale: float = 1.0) -> list[dict[str, Tensor]]:
    """``n`` state dicts with identical keys/shapes. Parent 0 is random normal; parent ``i > 0`` is
    parent 0 plus ``delta_scale`` times fresh noise (``delta_scale = 1`` ~ independent-ish)."""
    g = torch.Generator().manual_seed(seed)
    shapes = sd1_synthetic_shapes()
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    result = []
    for i in range(n):
        sd: dict[str, Tensor] = {}
        for k, s in shapes.items():
            if k == POSITION_IDS_KEY:
                sd[k] = torch.arange(77, dtype=torch.int64).reshape(s)
            elif i == 0:
                sd[k] = base[k].to(dtype)
            else:
                sd[k] = (base[k] + delta_scale * torch.randn(s, generator=g)).to(dtype)
        result.append(sd)
    return result

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
    """One synthetic SD1 state dict without ``position_ids`` (which loading drops)."""
    (sd,) = synthetic_state_dicts(n=1, dtype=dtype, seed=seed)
    del sd[POSITION_IDS_KEY]
    return sd
