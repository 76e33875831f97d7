"""Dropping what is not part of the model from an LDM state dict.

Dropped: EMA copies (``model_ema.*``), the DDPM noise-schedule buffers that LDM training
checkpoints carry at top level (``betas``, ``alphas_cumprod``, ... ``logvar``: derived from the
scheduler config, never merged), training leftovers (optimizer or loss entries), and the CLIP
``position_ids`` buffer (a constant ``arange``; merging it as floats is a known source of broken
checkpoints, and every loader recreates it), and ComfyUI's empty ``v_pred`` marker (read first by
:mod:`optimizer.checkpoint.prediction`). Everything else must be owned by a block of the layout.
"""

from __future__ import annotations

import re

import torch

_DROP = re.compile(
    r"^(model_ema\.|betas$|alphas_cumprod|alphas_cumprod_prev$|sqrt_|log_one_minus_alphas_cumprod$|"
    r"posterior_|logvar$|lvlb_weights$|optimizer|loss|global_step|epoch|lr_scheduler)"
    r"|(\.|^)position_ids$|^v_pred$"
)


def is_dropped_key(key: str) -> bool:
    """True for keys that are not model weights (see module docstring)."""
    return bool(_DROP.search(key))


def drop_non_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new dict without EMA copies, schedule buffers, training leftovers and position_ids."""
    return {k: v for k, v in state_dict.items() if not is_dropped_key(k)}
