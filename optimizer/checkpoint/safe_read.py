"""Reading raw state dicts from weight files, safely.

- ``.safetensors``: read with the safetensors library (no code execution possible). Truncated or
  corrupt files raise :class:`CheckpointError` saying so.
- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: only through ``torch.load(weights_only=True)``, which
  unpickles tensors and plain containers and nothing else. A pickle that needs any other global
  (arbitrary code: a payload, or a training callback object) is refused with the reason.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from optimizer.checkpoint.types import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt?): {exc}"
        ) from exc
    return tensors, metadata


def _unwrap(obj: object, *, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a training checkpoint (``{"state_dict": {...}, ...}``)."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_pickle_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a pickled checkpoint, loaded with ``torch.load(weights_only=True)`` only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: this pickle needs code execution to load, which evomerge never does "
            f"(torch.load weights_only=True said: {str(exc).splitlines()[0]}). Convert it to "
            ".safetensors with a tool you trust, or get the .safetensors release of the model."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {exc}") from exc
    return _unwrap(obj, path=path)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """``(tensors, metadata, format)`` of one weight file, dispatching on its suffix."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        tensors, metadata = read_safetensors(path)
        return tensors, metadata, "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return read_pickle_weights_only(path), {}, "ckpt"
    raise CheckpointError(
        f"{path}: unknown checkpoint format {suffix!r}; expected .safetensors, .ckpt/.pt/.pth or a diffusers folder"
    )
