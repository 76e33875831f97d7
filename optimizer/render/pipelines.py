"""Views of a diffusers pipeline with some components replaced (scheduler, VAE), nothing copied."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["denoiser", "replace_components"]


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoiser module: ``pipe.unet`` (SD1/SD2/SDXL) or ``pipe.transformer`` (SD3, Flux)."""
    module = getattr(pipe, "unet", None)
    return module if module is not None else pipe.transformer


def replace_components(pipe: Any, **replacements: Any) -> Any:
    """A new pipeline of ``type(pipe)`` sharing every component of ``pipe`` except ``replacements``.

    Built with the class's own ``__init__`` from ``pipe.components`` plus the optional config
    arguments ``pipe`` was built with (``requires_safety_checker``, ``force_zeros_for_empty_prompt``,
    SDXL's ``add_watermarker``), with ``pipe``'s progress-bar settings. ``pipe`` is not modified.

    Not ``DiffusionPipeline.from_pipe``: in diffusers (checked on 0.42) it ends with
    ``new_pipeline.to(dtype=torch_dtype or float32)``, which casts the *shared* UNet and text
    encoders in place, so a half-precision pipeline would silently become float32 (and a UNet
    whose weights are views of the merge buffer would lose them).
    """
    components = dict(pipe.components)
    unknown = sorted(set(replacements) - set(components))
    if unknown:
        raise ValueError(f"{type(pipe).__name__} has no component(s) {unknown}; it has {sorted(components)}")
    cls = type(pipe)
    parameters = inspect.signature(cls.__init__).parameters
    _, optional = cls._get_signature_keys(pipe)
    config_kwargs = {k: pipe.config[k] for k in optional if k in pipe.config and k in parameters}
    if "add_watermarker" in parameters and hasattr(pipe, "watermark"):  # SDXL: an init argument not kept in the config
        config_kwargs["add_watermarker"] = pipe.watermark is not None
    components.update(replacements)
    new = cls(**components, **config_kwargs)
    if "_name_or_path" in pipe.config:
        new.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    progress = getattr(pipe, "_progress_bar_config", None)
    if progress is not None:
        new.set_progress_bar_config(**progress)
    return new
