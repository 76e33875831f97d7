"""Recalibration inside a study: parents' statistics once, per-block targets and a correction per trial.

:class:`StudyRecalibrator` is built once per study from the pipeline bound to the merge buffer. It
merges each parent alone (``alpha = 0``, then ``1``) to collect its GroupNorm/LayerNorm statistics
on the calibration batch (the first ``prompts`` search prompts, each at every timestep, encoded by
that parent's own text encoder). Per trial, after the merge, :meth:`StudyRecalibrator.apply` builds
the targets ``(1 - alpha_b) * stats_A + alpha_b * stats_B`` with ``alpha_b`` the recipe's alpha of
the block ``b`` that owns each norm layer, and calls
:func:`~optimizer.merge.recalibrate.recalibrate_norms` (affine parameters rewritten in the merge
buffer; the next merge overwrites them). The owner block of a layer is found by address: its weight
is a view of one LDM key of the buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from optimizer.merge import Merger, MergeRecipe
from optimizer.merge.recalibrate import (
    CalibrationBatch,
    NormStats,
    RecalibrationStats,
    collect_norm_statistics,
    interpolate_statistics,
    make_calibration_batch,
    norm_layers,
    recalibrate_norms,
)
from optimizer.study.config import RecalibrateConfig, StudyConfigError

__all__ = ["StudyRecalibrator"]


@dataclass(frozen=True)
class _Layer:
    name: str
    block: str


class StudyRecalibrator:
    """See the module docstring. ``pipe``: the pipeline bound to ``merger``'s output (SD1/SD2)."""

    def __init__(self, *, pipe, merger: Merger, prompts: Sequence[str], config: RecalibrateConfig) -> None:
        bank = merger.bank
        if bank.layout.name == "sdxl":
            raise StudyConfigError("recalibrate: SDXL is not supported yet (its UNet needs pooled text and size conditioning)")
        if bank.layout.spec.denoiser != "unet":
            raise StudyConfigError(f"recalibrate: {bank.layout.name} is not supported (it recalibrates the norms of an SD1/SD2 UNet)")
        if bank.n_parents != 2:
            raise StudyConfigError(f"recalibrate: needs two parents, the study has {bank.n_parents}")
        if not prompts:
            raise StudyConfigError("recalibrate: the prompt set has no search prompts")
        self.pipe, self.merger, self.config = pipe, merger, config
        self.prompts = list(prompts)[: config.prompts]
        unet = pipe.unet
        self.layers = self._owner_blocks(unet, merger)
        size = int(unet.config.sample_size)
        self._latent_shape = (int(unet.config.in_channels), size, size)
        self.parent_stats: list[dict[str, NormStats]] = []
        layout = bank.layout
        for alpha in (0.0, 1.0):
            merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=alpha))
            self.parent_stats.append(collect_norm_statistics(unet=unet, batch=self.batch(), layers=[l.name for l in self.layers]))

    @staticmethod
    def _owner_blocks(unet: torch.nn.Module, merger: Merger) -> list[_Layer]:
        by_address = {view.data_ptr(): key for key, view in merger.state_dict().items() if view.numel()}
        layout = merger.bank.layout
        out = []
        for name, module in norm_layers(unet).items():
            key = by_address.get(module.weight.data_ptr())
            if key is None:
                raise StudyConfigError(f"recalibrate: norm layer {name} is not bound to the merge buffer")
            out.append(_Layer(name=name, block=layout.owner_of(key)))
        return out

    def batch(self) -> CalibrationBatch:
        """The calibration batch encoded by the pipeline's current text encoder."""
        pipe = self.pipe
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(self.prompts, pipe.unet.device, 1, False)
        timesteps = list(self.config.timesteps)
        hidden = embeds.float().cpu().repeat_interleave(len(timesteps), dim=0)
        return make_calibration_batch(
            encoder_hidden_states=hidden, timesteps=timesteps * len(self.prompts), latent_shape=self._latent_shape, seed=self.config.seed
        )

    def apply(self, recipe: MergeRecipe) -> RecalibrationStats:
        """Correct the merged UNet (the buffer must hold ``recipe``'s merge, before any LoRA)."""
        alpha = recipe.params["alpha"]
        weights = {l.name: (1.0 - alpha[l.block], alpha[l.block]) for l in self.layers}
        targets = interpolate_statistics(parents=self.parent_stats, weights=weights)
        return recalibrate_norms(unet=self.pipe.unet, batch=self.batch(), targets=targets)
