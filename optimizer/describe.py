"""A summary of a checkpoint for people: architecture, hashes, dtypes, per-block sizes."""

from __future__ import annotations

from collections import Counter
from typing import Any

from optimizer.checkpoint.hashing import legacy_hash
from optimizer.checkpoint.types import Checkpoint


def describe_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    """Architecture, format, hashes, dtype counts, and ``{block: {keys, params}}`` in MBW order.

    Blocks are listed in layout order, then components (VAE). ``params`` counts elements.
    """
    layout = checkpoint.layout
    assignment = layout.assign(checkpoint.state_dict)
    keys: Counter[str] = Counter()
    params: Counter[str] = Counter()
    for key, owner in assignment.owner.items():
        keys[owner] += 1
        params[owner] += checkpoint.state_dict[key].numel()
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in checkpoint.state_dict.values())
    groups = [*layout.blocks, *layout.components]
    return {
        "path": str(checkpoint.path),
        "architecture": layout.name,
        "title": layout.spec.title,
        "format": checkpoint.source_format,
        "sha256": checkpoint.sha256,
        "short_hash": checkpoint.short_hash,
        "legacy_hash": legacy_hash(checkpoint.path) if checkpoint.path.is_file() else None,
        "tensors": len(checkpoint.state_dict),
        "parameters": sum(params.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "blocks": {g: {"keys": keys[g], "params": params[g]} for g in groups},
        "merge_recipe": checkpoint.metadata.get("sd_merge_recipe"),
    }
