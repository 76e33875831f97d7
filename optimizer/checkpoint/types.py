"""The in-memory checkpoint: LDM-named tensors plus provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from optimizer.architectures.layout import BlockLayout
from optimizer.errors import EvomergeError


class CheckpointError(EvomergeError, ValueError):
    """A checkpoint cannot be read, is unsafe to read, or is not a Stable Diffusion model."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    ``state_dict`` always uses LDM / A1111 single-file key names (``model.diffusion_model.*``,
    ``first_stage_model.*``, ``cond_stage_model.*`` or ``conditioner.embedders.*``), whatever the
    file format was. ``sha256`` is the full hash of the file (for a diffusers folder: the sha256 of
    the sorted ``relative-path sha256`` lines of its weight files); ``short_hash`` is A1111's
    10-character form.
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    layout: BlockLayout
    sha256: str
    source_format: str  # "safetensors" | "ckpt" | "diffusers"
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``epsilon`` / ``v_prediction`` where the file says (:mod:`optimizer.checkpoint.prediction`)
    prediction_type: str | None = None
    #: the floating-point dtype holding most of the file's elements, before any cast on load (``float16``)
    stored_dtype: str | None = None

    @property
    def architecture(self) -> str:
        return self.layout.name

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix else self.path.name
