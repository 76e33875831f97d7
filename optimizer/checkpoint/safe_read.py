"""Reading raw state dicts from weight files, safely.

- ``.safetensors``: read with the safetensors library (no code execution possible). Truncated or
  corrupt files raise :class:`CheckpointError` saying so.
- ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``: only through ``torch.load(weights_only=True)``, which
  unpickles tensors and plain containers and nothing else. A pickle that needs any other global
  (arbitrary code: a payload, or a training callback object) is refused with the reason, and
  never with torch's advice to retry with ``weights_only=False``.
- Before any byte is read, the path must be a regular, non-empty file (after following links): a
  FIFO would block the reader forever and ``/dev/zero`` would be read without end.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from optimizer.checkpoint.types import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def check_weight_file(path: str | os.PathLike[str], *, error: type[Exception] = CheckpointError) -> Path:
    """``path`` if it is a regular file with at least one byte (links followed); else ``error``
    saying what it is. Called before opening any weight file: reading a FIFO blocks forever and
    reading a device such as ``/dev/zero`` never ends."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read: {exc.strerror}") from None
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
        raise error(f"{path}: {kind}, not a weights file")
    if info.st_size == 0:
        raise error(f"{path}: empty file (0 bytes)")
    return path


def unpickler_reason(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, without torch's advice: the line naming the
    unsupported global (``Unsupported global: GLOBAL os.system``) when there is one, else the first
    line that does not suggest ``weights_only=False``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "unsupported global" in line.lower() or line.lower().startswith("unsupported"):
            return line.removeprefix("WeightsUnpickler error: ").split(". ")[0]
    for line in lines:
        if "weights_only" not in line and "trust" not in line.lower() and not line.lower().startswith("weights only load failed"):
            return line
    return type(exc).__name__


def load_torch_weights_only(path: str | os.PathLike[str], *, error: type[Exception], what: str) -> object:
    """``torch.load(path, weights_only=True)`` on CPU after :func:`check_weight_file`; any unpickling
    failure becomes ``error`` naming ``what`` and the file (a pickle that needs code is refused)."""
    path = check_weight_file(path, error=error)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise error(f"{what}: {path}: not a weights-only torch file: {unpickler_reason(exc)}") from None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    check_weight_file(path)
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
    check_weight_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        reason = unpickler_reason(exc)
        if "global" not in reason.lower():  # e.g. "Unsupported operand 110": not a pickle at all
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file, truncated or corrupt?): {reason}") from None
        raise CheckpointError(
            f"{path}: refused: this pickle needs code execution to load, which evomerge never does "
            f"(torch.load weights_only=True said: {reason}). Convert it to "
            ".safetensors with a tool you trust, or get the .safetensors release of the model."
        ) from None
    except Exception as exc:  # noqa: BLE001 - unpickling arbitrary bytes raises anything (IndexError, KeyError, ...)
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file, truncated or corrupt?): {detail}") from None
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
