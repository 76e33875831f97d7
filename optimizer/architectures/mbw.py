"""A1111 / supermerger "merge block weighted" (MBW) strings.

An MBW string is one number per block in layout order, separated by commas (supermerger also
accepts spaces): 26 values for SD1.x/SD2.x (``BASE,IN00..IN11,M00,OUT00..OUT11``) and 20 for
SDXL (``BASE,IN00..IN08,M00,OUT00..OUT08``). Parsing then formatting returns the string verbatim
(up to whitespace): ``format_mbw(parse_mbw(s)) == s``.

supermerger applies a 26-value string to SDXL as ``BASE + w[:9] + w[12:22]`` of the 25 UNet values;
:func:`parse_mbw` does the same only when asked (``sd1_string_for_sdxl=True``).
"""

from __future__ import annotations

import math
import re

from optimizer.architectures.layout import BlockLayout, LayoutError

_SEPARATOR = re.compile(r"[,\s]+")


class MBWError(LayoutError):
    """An MBW string has the wrong number of values or a value that is not a finite number."""


def parse_mbw(text: str, *, layout: BlockLayout, sd1_string_for_sdxl: bool = False) -> dict[str, float]:
    """Parse an MBW string into ``{block: value}`` for ``layout``."""
    parts = [p for p in _SEPARATOR.split(text.strip()) if p]
    values: list[float] = []
    for i, part in enumerate(parts):
        try:
            value = float(part)
        except ValueError:
            raise MBWError(f"MBW value {i + 1} ({part!r}) is not a number") from None
        if not math.isfinite(value):
            raise MBWError(f"MBW value {i + 1} ({part!r}) is not finite")
        values.append(value)
    n = len(layout.blocks)
    if sd1_string_for_sdxl and layout.name == "sdxl" and len(values) == 26:
        unet = values[1:]
        values = [values[0], *unet[:9], *unet[12:22]]
    if len(values) != n:
        hint = " (a 26-value SD1 string can be mapped with sd1_string_for_sdxl)" if layout.name == "sdxl" and len(values) == 26 else ""
        raise MBWError(f"{layout.name} takes {n} MBW values ({', '.join(layout.blocks)}), got {len(values)}{hint}")
    return dict(zip(layout.blocks, values, strict=True))


def format_number(value: float) -> str:
    """Shortest exact decimal form, without a trailing ``.0`` (``1.0 -> '1'``, ``0.3 -> '0.3'``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def format_mbw(weights: dict[str, float], *, layout: BlockLayout) -> str:
    """Format ``{block: value}`` as a comma-separated MBW string in layout order."""
    missing = [b for b in layout.blocks if b not in weights]
    if missing:
        raise MBWError(f"MBW weights lack blocks {missing}")
    extra = sorted(set(weights) - set(layout.blocks))
    if extra:
        raise MBWError(f"MBW weights name blocks not in {layout.name}: {extra}")
    return ",".join(format_number(weights[b]) for b in layout.blocks)
