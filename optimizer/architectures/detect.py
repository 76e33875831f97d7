"""Architecture detection from checkpoint keys (LDM names).

A layout's ``identify`` section says which key prefixes must all be present and which must be
absent. Exactly one shipped layout must match; SD1 and SD2 UNet-only files (no text encoder) are
told apart by the cross-attention width (``context_dim``). Anything else is a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from optimizer.architectures.layout import BlockLayout, LayoutError, available_layouts, load_layout

_CROSS_ATTN_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


class ArchitectureError(LayoutError):
    """The keys match no known architecture, several, or parents disagree."""


def _has_prefix(keys: Sequence[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_architecture(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> BlockLayout:
    """Return the layout whose ``identify`` rules match ``state_dict``'s keys."""
    keys = list(state_dict)
    if not _has_prefix(keys, "model.diffusion_model."):
        raise ArchitectureError(
            f"{source}: no UNet keys (model.diffusion_model.*); is this a LoRA, a VAE or an embedding "
            "rather than a Stable Diffusion checkpoint?"
        )
    matches: list[BlockLayout] = []
    for name in available_layouts():
        layout = load_layout(name)
        ident = layout.spec.identify
        if all(_has_prefix(keys, p) for p in ident.all) and not any(_has_prefix(keys, p) for p in ident.none):
            matches.append(layout)
    if len(matches) > 1:
        has_text = _has_prefix(keys, "cond_stage_model.") or _has_prefix(keys, "conditioner.")
        cross = state_dict.get(_CROSS_ATTN_KEY)
        if not has_text and cross is not None:
            by_width = [m for m in matches if m.spec.identify.context_dim == cross.shape[1]]
            # tiny test models have other widths: fall back to the first candidate (SD1)
            matches = by_width or matches[:1]
        elif not has_text:
            matches = matches[:1]
    if not matches:
        raise ArchitectureError(
            f"{source}: keys match no known architecture ({', '.join(available_layouts())}); "
            "mixed SD1/SDXL keys or an unsupported model family"
        )
    if len(matches) > 1:
        raise ArchitectureError(f"{source}: keys match several architectures: {[m.name for m in matches]}")
    return matches[0]


def check_compatible(state_dicts: Sequence[Mapping[str, torch.Tensor]], *, names: Sequence[str]) -> BlockLayout:
    """Detect each parent's architecture and check that all agree on keys and shapes.

    Returns the common layout. Raises :class:`ArchitectureError` naming the parents and the first
    differing key when architectures differ, merged keys are missing, or shapes differ.
    """
    if len(state_dicts) != len(names):
        raise ValueError("one name per state dict")
    layouts = [detect_architecture(sd, source=n) for sd, n in zip(state_dicts, names, strict=True)]
    first = layouts[0]
    for layout, name in zip(layouts[1:], names[1:], strict=True):
        if layout.name != first.name:
            raise ArchitectureError(f"cannot merge {names[0]} ({first.name}) with {name} ({layout.name})")
    ref = state_dicts[0]
    for sd, name in zip(state_dicts[1:], names[1:], strict=True):
        missing = sorted(set(ref) - set(sd))
        extra = sorted(set(sd) - set(ref))
        if missing or extra:
            detail = f"missing {missing[:3]}" if missing else f"extra {extra[:3]}"
            raise ArchitectureError(f"{name} has different keys from {names[0]}: {detail} ({len(missing)} missing, {len(extra)} extra)")
        for key, tensor in ref.items():
            if sd[key].shape != tensor.shape:
                raise ArchitectureError(
                    f"shape mismatch at {key}: {names[0]} has {tuple(tensor.shape)}, {name} has {tuple(sd[key].shape)}"
                )
    return first
