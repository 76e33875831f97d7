"""Reconciling parents that differ only in keys inference never reads.

An SD2 checkpoint saved by A1111/LDM carries the last layer of its OpenCLIP text tower and
``text_projection``; SD2 conditions on the penultimate layer, so diffusers folders drop them. Two
such parents are the same model in two formats, and a merge of them must not fail on the key
check. :func:`fill_inference_unused` copies each such key from the first parent that has it into
the parents that lack it (the copy is never read by inference; the merged file then carries it as
an A1111 file would). Which keys qualify is data: the layout's ``inference_unused`` patterns.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping, Sequence

from torch import Tensor

from optimizer.architectures.layout import BlockLayout


def _qualifies(key: str, pattern: re.Pattern[str], top_layer: dict[str, int]) -> bool:
    m = pattern.match(key)
    if m is None:
        return False
    if "layer" not in pattern.groupindex:
        return True
    return int(m.group("layer")) == top_layer[pattern.pattern]


def _top_layers(keys: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> dict[str, int]:
    top: dict[str, int] = {}
    for pattern in patterns:
        if "layer" in pattern.groupindex:
            layers = [int(m.group("layer")) for k in keys if (m := pattern.match(k))]
            top[pattern.pattern] = max(layers, default=-1)
    return top


def fill_inference_unused(
    state_dicts: Sequence[MutableMapping[str, Tensor]], *, layout: BlockLayout, names: Sequence[str]
) -> list[str]:
    """Copy keys that match ``layout.inference_unused`` into the parents that lack them, in place.

    A key qualifies when it matches a pattern (for a pattern with a ``layer`` group: only at the
    highest layer index of the parent that has it) and at least one parent lacks it. Every other
    key difference is left for the architecture check to report. Returns one note per parent that
    was filled (empty when nothing was needed).
    """
    patterns = layout.inference_unused
    if not patterns or len(state_dicts) < 2:
        return []
    key_sets = [set(sd) for sd in state_dicts]
    union = set().union(*key_sets)
    common = set.intersection(*key_sets)
    candidates = union - common
    if not candidates:
        return []
    donors: dict[str, int] = {}
    for index, sd in enumerate(state_dicts):
        top = _top_layers(list(sd), patterns)
        for key in candidates - donors.keys():
            if key in sd and any(_qualifies(key, p, top) for p in patterns):
                donors[key] = index
    notes = []
    for index, sd in enumerate(state_dicts):
        filled = [key for key in sorted(donors) if key not in sd]
        for key in filled:
            sd[key] = state_dicts[donors[key]][key]
        if filled:
            sources = sorted({names[donors[k]] for k in filled})
            notes.append(
                f"{names[index]}: added {len(filled)} key(s) that inference never reads "
                f"({', '.join(filled[:2])}{', ...' if len(filled) > 2 else ''}) from {', '.join(sources)}"
            )
    return notes
