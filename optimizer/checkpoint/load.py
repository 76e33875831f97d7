"""Loading any supported checkpoint into a :class:`Checkpoint` with LDM key names."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from optimizer.architectures.detect import canonical_state_dict
from optimizer.architectures.layout import LayoutError
from optimizer.checkpoint.cleanup import drop_non_weights
from optimizer.checkpoint.hashing import sha256_file, sha256_folder
from optimizer.checkpoint.safe_read import read_weights
from optimizer.checkpoint.types import Checkpoint, CheckpointError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: torch's own names, as recipe documents record them (``float16``)
_TORCH_NAMES = {str(d).removeprefix("torch."): d for d in DTYPES.values()}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16" | "bf16" | "fp32"`` (or torch's ``float16``...) ``| torch.dtype | None`` -> dtype; a clear error for anything else."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()] if name.lower() in DTYPES else _TORCH_NAMES[name.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def cast_floats(state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Cast floating-point tensors to ``dtype`` (no-op when None); integer tensors are kept."""
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def storage_dtype(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The floating-point dtype holding most elements of ``state_dict`` (``float16``), None without float tensors."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    if not counts:
        return None
    return str(max(counts, key=counts.__getitem__)).removeprefix("torch.")


def load_checkpoint(path: str | os.PathLike[str], *, dtype: str | torch.dtype | None = None) -> Checkpoint:
    """Load a Stable Diffusion checkpoint from an LDM single file or a diffusers folder.

    Supported: ``.safetensors`` (A1111/civitai single files), ``.ckpt``/``.pt`` through
    ``torch.load(weights_only=True)`` only, and diffusers folders (``model_index.json`` with
    ``unet/`` or ``transformer/``, ``vae/``, ``text_encoder/``...), bare transformer files (Flux's
    ``flux1-dev.safetensors``) and ComfyUI-saved files. Keys come back in canonical naming with EMA copies and
    training leftovers dropped; the architecture is detected from the keys. Raises
    :class:`CheckpointError` (or an architecture error) with the reason for anything else.
    """
    path = Path(path)
    target = parse_dtype(dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        from optimizer.checkpoint.diffusers_folder import read_diffusers_folder

        state_dict, _architecture, _configs = read_diffusers_folder(path)
        metadata: dict[str, str] = {}
        source_format = "diffusers"
        digest = sha256_folder(path)
    else:
        tensors, metadata, source_format = read_weights(path)
        state_dict = tensors
        digest = sha256_file(path)
    if "scaled_fp8" in state_dict:
        raise CheckpointError(
            f"{path}: a ComfyUI scaled-fp8 checkpoint (weights stored as fp8 times per-tensor scales) cannot be merged "
            "as is; save it from ComfyUI in fp16 or bf16"
        )
    raw_keys = frozenset(state_dict)
    state_dict = drop_non_weights(state_dict)
    stored = storage_dtype(state_dict)
    state_dict = cast_floats(state_dict, dtype=target)
    if not state_dict:
        raise CheckpointError(f"{path}: contains no tensors")
    try:
        state_dict, layout = canonical_state_dict(state_dict, source=str(path))
        layout.assign(state_dict)  # every key owned by exactly one block or component
    except LayoutError as exc:
        raise CheckpointError(str(exc)) from exc
    from optimizer.checkpoint.prediction import read_prediction_type

    return Checkpoint(
        path=path, state_dict=state_dict, layout=layout, sha256=digest, source_format=source_format, metadata=metadata,
        prediction_type=read_prediction_type(path, metadata=metadata, source_format=source_format, keys=raw_keys),
        stored_dtype=stored,
    )
