"""Render a prompt set with a diffusers pipeline: batched, seeded per image, memory-aware.

Contract of :class:`Renderer`:

* Image ``i`` of a job list depends only on the weights, the job (prompt, negative prompt, seed)
  and the prompt set's sampling settings: its initial noise (and, for ancestral samplers, every
  noise draw) comes from its own ``torch.Generator("cpu").manual_seed(seed)``, so it does not
  depend on its batch or on the device the noise is drawn for. On CPU, rendering the same job
  list twice gives bit-identical images (tested); across batch sizes images agree to float
  rounding.
* Batches are sized to the device's memory (``batch_size="auto"``): on CUDA the first batch is one
  image, whose peak memory above the resident weights gives the cost of an image, and later
  batches take ``memory_fraction`` of the free memory (at most ``max_batch_size``). On CPU
  ``auto`` means ``cpu_batch_size``. On any device an out-of-memory error halves the batch and
  retries; a single image that does not fit raises :class:`RenderOutOfMemory`.
* Images come back as float32 ``[N, 3, H, W]`` in [0, 1] on the pipeline's device. A NaN or
  infinite pixel raises :class:`NonFiniteImages` naming the jobs (a broken merge is a failed
  trial, not a black image).

The pipeline is built once per study; :class:`Renderer` makes a view of it
(:func:`~optimizer.render.pipelines.replace_components`: the same modules, the prompt set's
scheduler) and never reloads weights: refill
the denoiser (``pipe.unet`` or ``pipe.transformer``) in place between candidates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from optimizer.errors import EvomergeError
from optimizer.render.pipelines import denoiser, replace_components
from optimizer.render.prompts import PromptSet, RenderJob
from optimizer.render.schedulers import make_scheduler

__all__ = ["NonFiniteImages", "RenderError", "RenderOutOfMemory", "RenderedBatch", "Renderer", "is_out_of_memory"]


class RenderError(EvomergeError, RuntimeError):
    """Rendering a candidate failed (the trial should fail with this message)."""


class RenderOutOfMemory(RenderError):
    """Not even one image fits in the device's memory."""


class NonFiniteImages(RenderError):
    """The pipeline produced NaN or infinite pixels."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator failure (CUDA ``OutOfMemoryError`` or a CPU allocation error)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


@dataclass(frozen=True)
class RenderedBatch:
    """Images of ``jobs[start : start + len(images)]`` of one :meth:`Renderer.batches` call."""

    start: int
    jobs: list[RenderJob]
    images: Tensor
    seconds: float


class Renderer:
    """Renders job lists of a :class:`PromptSet` with one pipeline (see the module docstring)."""

    def __init__(
        self,
        pipe,
        *,
        prompt_set: PromptSet,
        batch_size: int | Literal["auto"] = "auto",
        max_batch_size: int = 64,
        cpu_batch_size: int = 16,
        memory_fraction: float = 0.8,
    ) -> None:
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        overrides = {}
        if prompt_set.scheduler is not None:
            overrides["scheduler"] = make_scheduler(prompt_set.scheduler, base_config=pipe.scheduler.config)
        self.pipe = replace_components(pipe, **overrides) if overrides else pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.prompt_set = prompt_set
        self.max_batch_size = max_batch_size
        self.memory_fraction = memory_fraction
        self._auto = batch_size == "auto"
        if self._auto:
            self._size = 1 if self.device.type == "cuda" else min(cpu_batch_size, max_batch_size)
        else:
            self._size = batch_size
        self._measured = not (self._auto and self.device.type == "cuda")
        self.bytes_per_image: int | None = None

    @property
    def device(self) -> torch.device:
        return denoiser(self.pipe).device

    @property
    def batch_size(self) -> int:
        """The batch size the next batch will use."""
        return self._size

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the images."""
        factor = getattr(self.pipe, "vae_scale_factor", 8)
        sample = getattr(self.pipe, "default_sample_size", None) or denoiser(self.pipe).config.sample_size
        default = sample * factor
        return (self.prompt_set.height or default, self.prompt_set.width or default)

    def _call(self, jobs: Sequence[RenderJob]) -> Tensor:
        height, width = self.size
        settings = self.prompt_set
        output = self.pipe(
            prompt=[j.prompt for j in jobs],
            negative_prompt=[j.negative for j in jobs],
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in jobs],
            height=height,
            width=width,
            output_type="pt",
        )
        return output.images.float()

    def _measure(self, jobs: Sequence[RenderJob]) -> Tensor:
        """Render one image and size later batches from its peak CUDA memory."""
        device = self.device
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        images = self._call(jobs)
        per_image = max(1, torch.cuda.max_memory_allocated(device) - baseline)
        free, _ = torch.cuda.mem_get_info(device)
        self.bytes_per_image = per_image
        self._size = max(1, min(self.max_batch_size, math.floor(self.memory_fraction * (free + per_image) / per_image)))
        self._measured = True
        return images

    def batches(self, jobs: Sequence[RenderJob]) -> Iterator[RenderedBatch]:
        """Render ``jobs`` in memory-sized batches, yielding each batch as soon as it is done."""
        jobs = list(jobs)
        start = 0
        while start < len(jobs):
            size = 1 if not self._measured else self._size
            chunk = jobs[start : start + size]
            began = time.perf_counter()
            try:
                images = self._call(chunk) if self._measured else self._measure(chunk)
            except Exception as exc:  # noqa: BLE001 - only allocator failures are handled
                if not is_out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(chunk) == 1:
                    raise RenderOutOfMemory(f"one {self.size[1]}x{self.size[0]} image does not fit in memory on {self.device}: {exc}") from exc
                self._size = max(1, len(chunk) // 2)
                self._measured = True
                continue
            bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            if bool(bad.any()):
                named = [f"{chunk[i].prompt!r} (seed {chunk[i].seed})" for i in torch.nonzero(bad).flatten().tolist()]
                raise NonFiniteImages(f"{len(named)} of {len(chunk)} images have NaN/inf pixels: " + ", ".join(named[:5]))
            yield RenderedBatch(start=start, jobs=chunk, images=images, seconds=time.perf_counter() - began)
            start += len(chunk)

    def render(self, jobs: Sequence[RenderJob]) -> Tensor:
        """All images of ``jobs`` as one ``[N, 3, H, W]`` tensor in job order."""
        parts = [batch.images for batch in self.batches(jobs)]
        if not parts:
            height, width = self.size
            return torch.empty(0, 3, height, width, device=self.device)
        return torch.cat(parts)
