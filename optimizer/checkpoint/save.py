"""Saving merged checkpoints atomically, with A1111-compatible merge metadata.

Files are written to a temporary file in the destination folder and renamed into place, so a
failure (bad input, full disk, Ctrl-C) never leaves a half-written checkpoint behind.

Metadata follows A1111's Checkpoint Merger: ``sd_merge_recipe`` is a JSON object describing the
merge, ``sd_merge_models`` maps each parent's full sha256 to ``{"name", "legacy_hash",
"sd_merge_recipe"}`` (the parent's own recipe when it was itself a merge, so provenance chains).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from optimizer.atomic import atomic_file
from optimizer.checkpoint.hashing import legacy_hash
from optimizer.checkpoint.types import Checkpoint, CheckpointError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds
    (see :mod:`optimizer.atomic`: stale temporaries of ours are cleaned, permissions follow the umask)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a file name for the checkpoint")
    if not path.parent.exists():
        raise CheckpointError(f"{path.parent}: output folder does not exist")
    with atomic_file(path) as tmp:
        yield tmp


def canonical_header(path: str | os.PathLike[str]) -> None:
    """Rewrite a safetensors file's JSON header in place with its metadata keys sorted.

    The safetensors library stores metadata in a hash map, so the same tensors and metadata are
    written in a different key order from run to run (and so with a different sha256). The
    rewritten header has the same bytes in a fixed order: the same length, the data untouched,
    so one merge always gives one file."""
    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
        header = json.loads(raw)
        ordered: dict[str, Any] = {}
        if "__metadata__" in header:
            ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
        ordered.update(sorted(header.items()))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for the library's compact JSON; never shift the data
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))  # the library pads its header with spaces too


def save_safetensors(
    *, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` as a single safetensors file, atomically.

    Tensors that share storage (views into the merge kernel's output buffer) are copied one at a
    time, as safetensors requires separate storages.
    """
    bad = [k for k, v in (metadata or {}).items() if not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"safetensors metadata values must be strings: {bad}")
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=dict(metadata or {}))
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors reports I/O failures as its own error
            raise CheckpointError(f"{path}: cannot write: {exc}") from None
        canonical_header(tmp)
    return Path(path)


def merge_metadata(*, recipe: Mapping[str, Any], parents: Sequence[Checkpoint]) -> dict[str, str]:
    """A1111-style ``sd_merge_recipe`` / ``sd_merge_models`` metadata for a merged checkpoint."""
    models: dict[str, dict[str, Any]] = {}
    for parent in parents:
        own = parent.metadata.get("sd_merge_recipe")
        models[parent.sha256] = {
            "name": parent.name,
            "legacy_hash": legacy_hash(parent.path) if parent.path.is_file() else None,
            "sd_merge_recipe": json.loads(own) if own else None,
        }
    full_recipe = {
        "type": "evomerge",
        **dict(recipe),
        "parents": [{"name": p.name, "sha256": p.sha256, "short_hash": p.short_hash} for p in parents],
    }
    return {
        "format": "pt",
        "sd_merge_recipe": json.dumps(full_recipe, sort_keys=True),
        "sd_merge_models": json.dumps(models, sort_keys=True),
    }
