"""A render pipeline whose weights ARE the merge kernel's output buffer (built once per study).

:func:`bound_pipeline` loads the first parent's pipeline once (for its configs, tokenizer and
scheduler), then replaces every UNet / text encoder / VAE parameter by a view into the
:class:`~optimizer.merge.Merger`'s output buffer (``load_state_dict(..., assign=True)``). After
that, ``merger.merge(recipe)`` changes what the pipeline renders with no copy and no disk I/O. The
binding is checked: every parameter of the three modules must be such a view.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from optimizer.checkpoint.keymap import ldm_to_diffusers
from optimizer.merge import Merger
from optimizer.merge_files import LoadedParents

__all__ = ["BindingError", "bound_pipeline", "parent_pipeline", "render_config_dir", "unet_config"]


class BindingError(RuntimeError):
    """The pipeline's modules do not match the merged weights (wrong config folder?)."""


def render_config_dir(parents: LoadedParents, *, config_dir: str | os.PathLike[str] | None = None) -> Path:
    """The diffusers config folder to render with: ``config_dir``; else the first parent's own
    folder (diffusers) or its zoo's ``config/``; else the shipped config of the architecture."""
    if config_dir is not None:
        path = Path(config_dir)
        if not (path / "model_index.json").is_file():
            raise BindingError(f"config_dir {path} is not a diffusers config folder (no model_index.json)")
        return path
    first = parents.checkpoints[0]
    if first.source_format == "diffusers":
        return Path(first.path)
    zoo = Path(first.path).resolve().parent.parent
    if (zoo / "manifest.json").is_file() and (zoo / "config" / "model_index.json").is_file():
        return zoo / "config"
    from optimizer.checkpoint.config_dir import diffusers_config_dir

    return Path(diffusers_config_dir(parents.bank.layout.spec.diffusers_config))


def _pipeline_class(architecture: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline


def bound_pipeline(*, merger: Merger, parents: LoadedParents, config_dir: str | os.PathLike[str] | None = None):
    """The first parent's pipeline with its weights bound to ``merger``'s output (see module docstring)."""
    return _bind(views=merger.state_dict(), buffer=merger.output, parents=parents, config_dir=config_dir)


def parent_pipeline(*, parents: LoadedParents, index: int, config_dir: str | os.PathLike[str] | None = None):
    """A pipeline whose weights are views of parent ``index``'s buffer in the bank (no copy): for
    output ensembles, which run the parents side by side. Do not modify its weights."""
    bank = parents.bank
    if not 0 <= index < bank.n_parents:
        raise BindingError(f"parent index {index} out of range (the bank holds {bank.n_parents})")
    buffer = bank.buffers[index]
    views = {span.key: span.view(buffer) for span in bank.spans}
    views.update(bank.passthrough)
    return _bind(views=views, buffer=buffer, parents=parents, config_dir=config_dir)


def _bind(*, views, buffer: torch.Tensor, parents: LoadedParents, config_dir: str | os.PathLike[str] | None):
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # per-component "Loading ..." bars and dtype notes
    diffusers_logging.disable_progress_bar()
    layout = parents.bank.layout
    folder = render_config_dir(parents, config_dir=config_dir)
    cls = _pipeline_class(layout.name)
    first = parents.checkpoints[0]
    dtype = parents.bank.dtype
    if first.source_format == "diffusers":
        pipe = cls.from_pretrained(str(first.path), local_files_only=True, torch_dtype=dtype, safety_checker=None)
    else:
        pipe = cls.from_single_file(str(first.path), config=str(folder), local_files_only=True, torch_dtype=dtype)
    weights = ldm_to_diffusers(state_dict=views, architecture=layout.name, config_dir=folder)
    low = buffer.data_ptr()
    high = low + buffer.numel() * buffer.element_size()
    for name, state in weights.items():
        module = getattr(pipe, name, None)
        if module is None:
            raise BindingError(f"the pipeline has no component {name!r} for the merged weights")
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        params = {n for n, _ in module.named_parameters()}
        if unexpected or params & set(missing):
            raise BindingError(
                f"{name}: merged weights do not fit the pipeline built from {folder}: "
                f"missing {sorted(params & set(missing))[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        unbound = [n for n, p in module.named_parameters() if not low <= p.data_ptr() < high]
        if unbound:
            raise BindingError(f"{name}: {len(unbound)} parameters are copies, not views of the merge buffer (e.g. {unbound[:3]})")
    pipe.to(parents.bank.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_config(parents: LoadedParents, *, config_dir: str | os.PathLike[str] | None = None) -> dict:
    """The UNet config of the render config folder (for mapping LoRA module names)."""
    import json

    path = render_config_dir(parents, config_dir=config_dir) / "unet" / "config.json"
    if not path.is_file():
        raise BindingError(f"no UNet config at {path}")
    return json.loads(path.read_text(encoding="utf-8"))
