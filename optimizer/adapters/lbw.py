"""LoRA block weights (LBW): per-block LoRA strengths written as the webui extension's strings.

Layouts are data (``layouts/lbw.yaml``), checked at load against the architecture's MBW layout.
An LBW string has one value per block of a layout: 17 (``lora``) or 26 (``lycoris``) for SD1/SD2,
12 or 20 for SDXL, or is a preset name (``OUTALL``) of the 17-value layout. :func:`parse_lbw` turns
it into ``{block: strength}`` for the blocks a LoRA touches, multiplied by a global strength.

A block the LoRA touches but the chosen layout does not list is an error (a LoCon that adapts
``IN00`` with a 17-value string): no strength is invented for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import yaml

from optimizer.adapters.lora_format import LoraError
from optimizer.architectures.layout import BlockLayout

__all__ = ["lbw_blocks", "lbw_presets", "parse_lbw"]


@lru_cache(maxsize=1)
def _data() -> dict:
    text = resources.files("optimizer.adapters").joinpath("layouts/lbw.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or not isinstance(data.get("layouts"), dict) or not isinstance(data.get("presets"), dict):
        raise LoraError("layouts/lbw.yaml: expected mappings 'layouts' and 'presets'")
    return data


def lbw_presets() -> dict[str, str]:
    """The preset names of the 17-value SD1 layout and their strings."""
    return dict(_data()["presets"])


def lbw_blocks(*, layout: BlockLayout, kind: str) -> tuple[str, ...]:
    """The MBW blocks of an LBW layout ``kind`` (``lora`` or ``lycoris``) for ``layout``, in order."""
    layouts = _data()["layouts"]
    name = layout.spec.lbw_layout  # the architecture record names its LBW layout
    if name is None or name not in layouts:
        raise LoraError(f"no LoRA block weight layouts for {layout.name}; known: {', '.join(layouts)}")
    kinds = layouts[name]
    if kind not in kinds:
        raise LoraError(f"LBW layout kind must be one of {', '.join(kinds)}, got {kind!r}")
    blocks = kinds[kind]
    if blocks == "all":
        return tuple(layout.blocks)
    unknown = [b for b in blocks if b not in layout.blocks]
    if unknown or len(set(blocks)) != len(blocks):
        raise LoraError(f"layouts/lbw.yaml: {layout.name}.{kind} lists unknown or repeated blocks {unknown or blocks}")
    return tuple(blocks)


def parse_lbw(text: str, *, layout: BlockLayout, touched: Sequence[str], strength: float = 1.0) -> dict[str, float]:
    """``{block: strength * value}`` for every block in ``touched`` (the blocks a LoRA adapts).

    ``text``: a preset name or comma-separated numbers; the count picks the layout (17/26 for SD1).
    """
    presets = lbw_presets()
    raw = presets.get(text.strip(), text)
    try:
        values = [float(v) for v in raw.split(",") if v.strip()]
    except ValueError:
        raise LoraError(f"LBW {text!r} is neither a preset ({', '.join(presets)}) nor comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise LoraError(f"LBW {text!r}: values must be finite")
    kinds = _data()["layouts"].get(layout.spec.lbw_layout or "", {"lora": None})
    candidates = {kind: lbw_blocks(layout=layout, kind=kind) for kind in kinds}
    matching = [kind for kind, blocks in candidates.items() if len(blocks) == len(values)]
    if not matching:
        sizes = " or ".join(f"{len(b)} ({k})" for k, b in candidates.items())
        raise LoraError(f"LBW {text!r} has {len(values)} values; {layout.name} takes {sizes}")
    blocks = candidates[matching[0]]
    per_block = dict(zip(blocks, values, strict=True))
    uncovered = [b for b in touched if b not in per_block]
    if uncovered:
        raise LoraError(
            f"LBW {text!r} ({matching[0]} layout) gives no value for block(s) {uncovered} that the LoRA adapts; "
            f"use the {len(layout.blocks)}-value layout"
        )
    return {b: float(strength) * per_block[b] for b in touched}
