"""``evomerge extract-lora``: load a merged model and its base, extract the LoRA between them
(:func:`optimizer.adapters.extract.extract_lora`) and write it as a kohya safetensors file,
atomically, with what it captures in the metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["extract_lora_file"]


def extract_lora_file(
    *,
    merged: str | os.PathLike[str],
    base: str | os.PathLike[str],
    rank: int,
    output: str | os.PathLike[str],
    config_dir: str | os.PathLike[str] | None = None,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write the LoRA taking ``base`` to ``merged`` to ``output``; returns the path and the summary."""
    from safetensors.torch import save_file

    from optimizer.adapters.extract import extract_lora
    from optimizer.adapters.lora import targets_for_bank
    from optimizer.adapters.lora_format import LoraError
    from optimizer.atomic import check_output, write_atomic
    from optimizer.checkpoint.load import parse_dtype
    from optimizer.merge_files import load_parents
    from optimizer.study.pipeline import unet_config

    if dtype not in ("fp16", "bf16", "fp32"):
        raise LoraError(f"--dtype {dtype!r}: use fp16, bf16 or fp32")
    output = check_output(output, overwrite=overwrite, what="LoRA")
    if output.suffix != ".safetensors":
        raise LoraError(f"the LoRA is a .safetensors file; got {output}")
    parents = load_parents(paths=[merged, base], device=device, dtype="fp32")
    bank = parents.bank
    if not bank.layout.ldm:
        raise LoraError(f"extract-lora writes UNet LoRAs (SD1, SD2, SDXL); {bank.layout.name} is not supported yet")
    views = [{span.key: span.view(bank.buffers[i]) for span in bank.spans} for i in range(2)]
    targets = targets_for_bank(bank, unet_config=unet_config(parents, config_dir=config_dir))
    with torch.inference_mode():
        result = extract_lora(merged=views[0], base=views[1], targets=targets, rank=rank, dtype=parse_dtype(dtype))
    summary = {**result.summary(), "merged": {"path": str(parents.checkpoints[0].path), "sha256": parents.checkpoints[0].sha256},
               "base": {"path": str(parents.checkpoints[1].path), "sha256": parents.checkpoints[1].sha256},
               "architecture": bank.layout.name, "not_captured_keys": result.not_captured[:20]}
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(result.rank), "ss_network_alpha": str(result.rank),
                "evomerge_extract": json.dumps(summary, sort_keys=True)}
    tensors = {k: result.tensors[k].detach().cpu().contiguous() for k in sorted(result.tensors)}
    written = write_atomic(output, lambda tmp: save_file(tensors, tmp, metadata=dict(sorted(metadata.items()))))
    return written, summary
