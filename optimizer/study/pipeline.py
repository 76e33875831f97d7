"""A render pipeline whose weights ARE the merge kernel's output buffer (built once per study).

:func:`bound_pipeline` builds the architecture record's pipeline class from the render config
folder: the modules the parents hold (UNet or transformer, text encoders, VAE) are built on the
meta device and every parameter is then *assigned* a view into the
:class:`~optimizer.merge.Merger`'s output buffer (``load_state_dict(..., assign=True)``), fused
q/k/v included (their parts are ``narrow`` views); tokenizers, scheduler and modules the parents
lack (a bare Flux transformer file has no T5) come from the folder. After that,
``merger.merge(recipe)`` changes what the pipeline renders with no copy and no disk I/O.

The binding is checked: every parameter must be such a view, except the tensors the key rules
compute (``swap_halves``: the final AdaLayerNormContinuous of SD3 / Flux), which are listed in
:func:`refreshed_tensors` and recomputed from the buffer after every merge
(:meth:`Merger.on_change`). A study never renders stale weights.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path

import torch

from optimizer.checkpoint.types import CheckpointError
from optimizer.errors import EvomergeError
from optimizer.merge import Merger
from optimizer.merge_files import LoadedParents
from optimizer.render.pipelines import denoiser

__all__ = ["BindingError", "bound_pipeline", "denoiser", "parent_pipeline", "pipeline_class", "refreshed_tensors", "render_config_dir", "unet_config"]


class BindingError(EvomergeError, RuntimeError):
    """The pipeline's modules do not match the merged weights (wrong config folder?)."""


def render_config_dir(parents: LoadedParents, *, config_dir: str | os.PathLike[str] | None = None) -> Path:
    """The diffusers config folder to render with: ``config_dir``; else the first parent's own
    folder (diffusers) or its zoo's ``config/``; else the shipped config of the architecture."""
    if config_dir is not None:
        path = Path(config_dir)
        if not (path / "model_index.json").is_file():
            raise BindingError(f"config_dir {path} is not a diffusers config folder (no model_index.json)")
        return path
    from optimizer.merge_files import default_config_dir

    return default_config_dir(parents)


_REFRESHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def refreshed_tensors(pipe) -> tuple[str, ...]:
    """The denoiser parameters a bound pipeline keeps outside the merge buffer and recomputes after
    every merge (``()`` when every parameter is a view); also for views of it (:class:`Renderer`)."""
    return _REFRESHED.get(denoiser(pipe), ())


def pipeline_class(layout):
    """The diffusers pipeline class of the architecture record (``pipeline``)."""
    import diffusers

    cls = getattr(diffusers, layout.spec.pipeline, None)
    if cls is None:
        raise BindingError(f"the installed diffusers has no {layout.spec.pipeline} for {layout.name}")
    return cls


def bound_pipeline(*, merger: Merger, parents: LoadedParents, config_dir: str | os.PathLike[str] | None = None):
    """The render pipeline with its weights bound to ``merger``'s output (see module docstring)."""
    return _bind(views=merger.state_dict(), buffer=merger.output, parents=parents, config_dir=config_dir, merger=merger)


def parent_pipeline(*, parents: LoadedParents, index: int, config_dir: str | os.PathLike[str] | None = None):
    """A pipeline whose weights are views of parent ``index``'s buffer in the bank (no copy): for
    output ensembles, which run the parents side by side. Do not modify its weights."""
    bank = parents.bank
    if bank.placement != "device":
        raise BindingError("an output ensemble runs the parents themselves: they must be on the device (placement: device)")
    if not 0 <= index < bank.n_parents:
        raise BindingError(f"parent index {index} out of range (the bank holds {bank.n_parents})")
    buffer = bank.buffers[index]
    views = {span.key: span.view(buffer) for span in bank.spans}
    views.update(bank.passthrough)
    return _bind(views=views, buffer=buffer, parents=parents, config_dir=config_dir, merger=None)


def _skeleton(cls, folder: Path, *, modules: dict, dtype: torch.dtype):
    """``cls.from_pretrained(folder)`` with ``modules`` given (nothing loaded for them): the
    tokenizers, scheduler and any weight-bearing module the parents lack come from ``folder``."""
    kwargs = dict(modules)
    if "safety_checker" in cls._get_signature_keys(cls)[1] or "safety_checker" in cls._get_signature_keys(cls)[0]:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype to dtype; >= 0.32 is supported
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, **kwargs)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for a folder that lacks a module
        missing = sorted(set(cls._get_signature_keys(cls)[0]) - set(modules))
        raise BindingError(
            f"cannot build {cls.__name__} from {folder}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            f"(the parents hold {sorted(modules)}; {folder} must supply {missing}: give config_dir a local diffusers "
            "folder of the model with those weights)"
        ) from exc


def _bind(*, views, buffer: torch.Tensor, parents: LoadedParents, config_dir, merger: Merger | None):
    from diffusers.utils import logging as diffusers_logging

    from optimizer.checkpoint.convert import empty_modules, recompute, to_diffusers

    diffusers_logging.set_verbosity_error()  # per-component "Loading ..." bars and dtype notes
    diffusers_logging.disable_progress_bar()
    layout = parents.bank.layout
    folder = render_config_dir(parents, config_dir=config_dir)
    try:
        converted = to_diffusers(state_dict=views, layout=layout, config_dir=folder)
    except CheckpointError as exc:
        from optimizer.merge_files import config_hint

        hint = "" if config_dir is not None else f"; {config_hint(parents)}"
        raise BindingError(f"the merged weights do not fit the configs in {folder}: {exc}{hint}") from exc
    modules = empty_modules(layout=layout, config_dir=folder, names=list(converted.modules))
    low = buffer.data_ptr()
    high = low + buffer.numel() * buffer.element_size()
    refreshed: list[tuple[torch.Tensor, str, str]] = []  # (parameter, canonical key, diffusers key)
    for name, state in converted.modules.items():
        module = modules[name]
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # T5: encoder.embed_tokens is shared.weight
        module.eval()  # built from a config, a module is in training mode: T5's dropout (0.1) would make every render differ
        params = dict(module.named_parameters())
        left = sorted(n for n, p in params.items() if p.device.type == "meta")
        if unexpected or left:
            raise BindingError(
                f"{name}: merged weights do not fit the pipeline built from {folder}: "
                f"missing {left[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        new = converted.new.get(name, {})
        unbound = [n for n, p in params.items() if not low <= p.data_ptr() < high and n not in new]
        if unbound:
            raise BindingError(f"{name}: {len(unbound)} parameters are copies, not views of the merge buffer (e.g. {unbound[:3]})")
        refreshed += [(params[d], c, d) for d, c in new.items() if d in params]
    pipe = _skeleton(pipeline_class(layout), folder, modules=modules, dtype=parents.bank.dtype)
    predicted = parents.prediction_type
    scheduler = getattr(pipe, "scheduler", None)
    if predicted and scheduler is not None and "prediction_type" in scheduler.config and scheduler.config.prediction_type != predicted:
        pipe.scheduler = type(scheduler).from_config(scheduler.config, prediction_type=predicted)  # the parents say
    pipe.to(parents.bank.device)
    pipe.set_progress_bar_config(disable=True)
    _REFRESHED[denoiser(pipe)] = tuple(sorted(d for _, _, d in refreshed))

    if refreshed and merger is not None:
        def refresh() -> None:
            with torch.no_grad():
                for param, canonical, diffusers_key in refreshed:
                    param.copy_(recompute(layout=layout, canonical_key=canonical, diffusers_key=diffusers_key, tensor=views[canonical]))

        merger.on_change(refresh)
    return pipe


def unet_config(parents: LoadedParents, *, config_dir: str | os.PathLike[str] | None = None) -> dict:
    """The UNet config of the render config folder (for mapping LoRA module names); ``{}`` for
    DiT records, whose LoRA targets come from their key rules."""
    import json

    if not parents.bank.layout.ldm:
        return {}
    path = render_config_dir(parents, config_dir=config_dir) / "unet" / "config.json"
    if not path.is_file():
        raise BindingError(f"no UNet config at {path}")
    return json.loads(path.read_text(encoding="utf-8"))
