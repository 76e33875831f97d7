"""Architecture detection from checkpoint keys (canonical names).

A record's ``identify`` section says which key prefixes must all be present and which must be
absent. Exactly one shipped record must match; SD1 and SD2 UNet-only files (no text encoder) are
told apart by the cross-attention width (``context_dim``). Anything else is a clear error naming
the closest known architecture and the key groups it misses or does not expect.

:func:`canonical_state_dict` first brings other file formats to the canonical keys: a bare
denoiser file (Black Forest Labs' ``flux1-dev.safetensors``: no ``model.diffusion_model.``)
gets the record's ``bare_prefix``; after detection, alias prefixes (a Flux VAE saved as
``first_stage_model.``) are renamed and the record's ``ignore`` keys (``logit_scale``) dropped.
A record's ``variants`` (Flux dev / schnell, SD3 / SD3.5) are told apart the same way, and
:func:`check_compatible` refuses parents of different variants before any work.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from optimizer.architectures.layout import BlockLayout, LayoutError, available_layouts, load_layout

_CROSS_ATTN_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


class ArchitectureError(LayoutError):
    """The keys match no known architecture, several, or parents disagree."""


def _has_prefix(keys: Sequence[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _group(key: str) -> str:
    """A key's group for messages: up to and including its first numeric part (``...double_blocks.18.``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1]) + "."
    return ".".join(parts[:3]) + ("." if len(parts) > 3 else "")


def _closest(keys: Sequence[str]) -> str:
    """``'closest is X: missing [...], unexpected [...]'`` for keys that match no record."""
    best = None
    for name in available_layouts():
        layout = load_layout(name)
        owned, foreign = 0, set()
        for key in keys:
            try:
                layout.owner_of(key)
                owned += 1
            except LayoutError:
                foreign.add(_group(key))
        ident = layout.spec.identify
        missing = [p for p in ident.all if not _has_prefix(keys, p)]
        extra = sorted(foreign) + [p for p in ident.none if _has_prefix(keys, p)]
        score = (owned - len(foreign), -len(missing))
        if best is None or score > best[0]:
            best = (score, layout, missing, extra)
    assert best is not None
    _, layout, missing, extra = best
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if extra:
        parts.append(f"unexpected {extra[:3]}" + (f" and {len(extra) - 3} more" if len(extra) > 3 else ""))
    return f"closest is {layout.name} ({layout.spec.title})" + (": " + ", ".join(parts) if parts else "")


def canonical_state_dict(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], BlockLayout]:
    """``(state dict with canonical keys, its record)``: bare prefix added, aliases renamed,
    ignored keys dropped, then :func:`detect_architecture`. The tensors are not copied."""
    sd = dict(state_dict)
    keys = list(sd)
    for name in available_layouts():
        layout = load_layout(name)
        bare = layout.spec.bare_prefix
        if not bare or _has_prefix(keys, bare):
            continue
        stripped = [p.removeprefix(bare) for p in layout.spec.identify.all if p.startswith(bare)]
        if stripped and all(_has_prefix(keys, p) for p in stripped):
            sd = {bare + k: v for k, v in sd.items()}
            break
    layout = detect_architecture(sd, source=source)
    if layout.spec.aliases or layout.spec.ignore:
        ignore = [re.compile(p) for p in layout.spec.ignore]
        renamed: dict[str, torch.Tensor] = {}
        for key, tensor in sd.items():
            if any(p.search(key) for p in ignore):
                continue
            for alias in layout.spec.aliases:
                if key.startswith(alias.prefix):
                    key = alias.canonical + key[len(alias.prefix):]
                    break
            if key in renamed:
                raise ArchitectureError(f"{source}: {key!r} is stored twice (under two prefixes of the same module)")
            renamed[key] = tensor
        sd = renamed
    return sd, layout


def variant_of(layout: BlockLayout, keys: Sequence[str]) -> str | None:
    """The name of the record's variant the keys are (None when the record has no variants)."""
    for variant in layout.spec.variants:
        if all(_has_prefix(keys, p) for p in variant.all) and not any(_has_prefix(keys, p) for p in variant.none):
            return variant.name
    return None


def shipped_config_name(layout: BlockLayout, keys: Sequence[str]) -> str:
    """The shipped config folder for these keys: the variant's (Flux schnell) or the record's."""
    name = variant_of(layout, keys)
    for variant in layout.spec.variants:
        if variant.name == name and variant.diffusers_config:
            return variant.diffusers_config
    return layout.spec.diffusers_config


def detect_architecture(state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> BlockLayout:
    """Return the layout whose ``identify`` rules match ``state_dict``'s keys."""
    keys = list(state_dict)
    if not _has_prefix(keys, "model.diffusion_model."):
        raise ArchitectureError(
            f"{source}: no denoiser keys (model.diffusion_model.*, or a bare Flux / SD3 transformer); is this a LoRA, "
            f"a VAE or an embedding rather than a diffusion checkpoint? ({_closest(keys)})"
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
        raise ArchitectureError(f"{source}: keys match no known architecture; {_closest(keys)}")
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
    first_variant = variant_of(first, list(state_dicts[0]))
    for layout, name, sd in zip(layouts[1:], names[1:], state_dicts[1:], strict=True):
        if layout.name != first.name:
            raise ArchitectureError(f"cannot merge {names[0]} ({first.name}) with {name} ({layout.name})")
        variant = variant_of(layout, list(sd))
        if variant != first_variant:
            raise ArchitectureError(
                f"cannot merge {names[0]} ({first.name} {first_variant}) with {name} ({layout.name} {variant}): different variants"
            )
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
