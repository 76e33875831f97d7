"""Extracting a LoRA from a merge: the difference between a merged model and its base, per layer,
as a low-rank kohya LoRA (``evomerge extract-lora MERGED BASE --rank R``).

Per adapted weight ``W`` (2-D linear, or 4-D conv flattened to ``[out, in * kh * kw]``)::

    D = W_merged - W_base = U S V^T              # SVD, in fp32
    up = U[:, :r] S[:r],  down = V[:, :r]^T       # r = min(rank, out, in * kh * kw)

so ``up @ down`` is the best rank-``r`` approximation of ``D`` (Eckart-Young); its relative error
``|D - up @ down|_F / |D|_F = sqrt(sum_{i > r} s_i^2 / sum_i s_i^2)`` is recorded per layer. A conv's
``down`` keeps the kernel (``[r, in, kh, kw]``) and ``up`` is ``[out, r, 1, 1]`` (kohya LoCon).
Every layer is stored at one rank ``R`` (the requested rank, or the largest any layer has, if
smaller), a layer of lower rank padded with zero factors, and ``alpha = R`` (scale 1): loaders that
take one ``lora_alpha`` for the whole file (diffusers' kohya path through PEFT) then scale every
layer right. Token and position embeddings are not LoRA targets. Names are kohya's (``lora_unet_<diffusers module>``, ``lora_te_...``; for
Flux/SD3 the canonical module), the format diffusers' ``load_lora_weights``, A1111 and ComfyUI
read. Weights that did not change are left out; 1-D tensors (norms, biases) cannot be expressed
by a LoRA and are counted as not captured, as are the modules kohya's networks do not adapt
(:func:`kohya_target`: conv_in/out, time and class embeddings; OpenCLIP text towers, whose q/k/v
are one tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from optimizer.adapters.lora import LoraTargets
from optimizer.adapters.lora_format import LoraError

__all__ = ["ExtractedLora", "extract_lora"]


@dataclass
class ExtractedLora:
    """The kohya tensors and what they capture."""

    tensors: dict[str, Tensor]
    rank: int
    errors: dict[str, float] = field(default_factory=dict)  # kohya name -> relative Frobenius error of the layer
    unchanged: int = 0  # adapted weights equal in both models (left out)
    not_captured: list[str] = field(default_factory=list)  # changed tensors a LoRA cannot express (1-D)

    def summary(self) -> dict[str, float | int]:
        errors = list(self.errors.values())
        return {"layers": len(errors), "rank": self.rank, "unchanged": self.unchanged, "not_captured": len(self.not_captured),
                "mean_relative_error": sum(errors) / len(errors) if errors else 0.0, "max_relative_error": max(errors, default=0.0)}


#: the UNet modules kohya's LoRA / LoCon networks adapt (sd-scripts ``networks/lora.py``): those inside
#: Transformer2DModel, ResnetBlock2D, Downsample2D and Upsample2D; conv_in/out and the time and
#: class embeddings are not, and loaders (diffusers' kohya converter) do not map them
_UNET_PARTS = ("_attentions_", "_resnets_", "_downsamplers_", "_upsamplers_")


def kohya_target(name: str, *, key: str) -> bool:
    """Whether the weight ``key`` (kohya name ``name``) is one a kohya LoRA adapts: the UNet parts of
    :data:`_UNET_PARTS`, every DiT block module, the text towers' attention and MLP linears."""
    if key.endswith(("_embedding.weight", "embed_tokens.weight", "shared.weight")):
        return False
    if not name.startswith("lora_unet_"):
        return True  # a text tower's linear
    unet = ("down_blocks", "up_blocks", "mid_block", "conv_", "time_", "add_", "class_")
    if any(name.startswith(f"lora_unet_{part}") for part in unet):
        return any(p in name for p in _UNET_PARTS)
    return True  # a DiT block module (double_blocks, joint_blocks, ...)


def extract_lora(
    *, merged: Mapping[str, Tensor], base: Mapping[str, Tensor], targets: LoraTargets, rank: int, dtype: torch.dtype = torch.float16
) -> ExtractedLora:
    """The rank-``rank`` LoRA taking ``base`` to ``merged`` (see the module docstring); both state
    dicts in the keys of ``targets``. Tensors are stored in ``dtype``."""
    if rank < 1:
        raise LoraError(f"--rank must be at least 1, got {rank}")
    adapted = {k for k, name in targets.kohya_names.items() if kohya_target(name, key=k)}
    widest = max((min(t.shape[0], t[0].numel()) for k, t in merged.items() if k in adapted and t.ndim in (2, 4)), default=1)
    stored = min(rank, widest)
    out = ExtractedLora(tensors={}, rank=stored)
    for key, tensor in merged.items():
        if key not in base or not tensor.is_floating_point():
            continue
        if key not in adapted or tensor.ndim not in (2, 4):
            if not torch.equal(tensor, base[key]):
                out.not_captured.append(key)
            continue
        delta = tensor.float() - base[key].float()
        if not bool(delta.any()):
            out.unchanged += 1
            continue
        name = targets.kohya_names[key]
        matrix = delta.reshape(delta.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        r = min(rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        total = float((s.double() ** 2).sum())
        out.errors[name] = math.sqrt(max(0.0, float((s[r:].double() ** 2).sum())) / total) if total > 0 else 0.0
        if r < stored:  # zero factors up to the file's one rank
            up = torch.cat([up, up.new_zeros(up.shape[0], stored - r)], dim=1)
            down = torch.cat([down, down.new_zeros(stored - r, down.shape[1])], dim=0)
        if delta.ndim == 4:
            down = down.reshape(stored, *delta.shape[1:])
            up = up.reshape(delta.shape[0], stored, 1, 1)
        out.tensors[f"{name}.lora_down.weight"] = down.contiguous().to(dtype)
        out.tensors[f"{name}.lora_up.weight"] = up.contiguous().to(dtype)
        out.tensors[f"{name}.alpha"] = torch.tensor(float(stored), dtype=dtype)
    if not out.errors:
        raise LoraError("the merged model equals the base in every layer a LoRA can adapt: there is nothing to extract")
    return out
