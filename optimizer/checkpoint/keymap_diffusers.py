"""LDM / A1111 single-file keys -> diffusers SD1 / SD2 / SDXL component state dicts (the inverse of
:func:`optimizer.checkpoint.keymap.diffusers_to_ldm`), and the component configs and empty models it checks against."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from optimizer.checkpoint.keymap import _CONFIG_FILES, UNET_PREFIX, _check_architecture, component_of, diffusers_to_ldm
from optimizer.checkpoint.types import CheckpointError

__all__ = ["empty_model", "ldm_to_diffusers", "load_component_configs"]


def load_component_configs(config_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Read ``unet``/``vae``/``text_encoder``/``text_encoder_2`` configs present in ``config_dir``."""
    root = Path(config_dir)
    configs: dict[str, dict[str, Any]] = {}
    for component, rel in _CONFIG_FILES.items():
        path = root / rel
        if path.is_file():
            try:
                configs[component] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot read config: {exc}") from exc
    return configs


def empty_model(component: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """The component model built from ``config`` on the meta device (no memory, no init cost)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            if component == "unet":
                from diffusers import UNet2DConditionModel

                return UNet2DConditionModel.from_config(dict(config))
            if component == "vae":
                from diffusers import AutoencoderKL

                return AutoencoderKL.from_config(dict(config))
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cfg = CLIPTextConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
            # SDXL's second tower carries the pooled-text projection; the others are plain towers
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            return cls(cfg)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any config error of the libraries
        raise CheckpointError(f"{component} config cannot build a model: {type(exc).__name__}: {exc}") from exc


def _droppable(ldm_key: str, *, prefix: str, text_format: str | None, config: Mapping[str, Any], architecture: str) -> bool:
    """LDM keys that exist in real checkpoints but have no diffusers counterpart (dropped silently)."""
    rest = ldm_key[len(prefix):]
    if text_format == "hf":
        return rest == "text_model.embeddings.position_ids"
    if text_format == "openclip":
        if rest in ("logit_scale", "attn_mask"):
            return True
        if architecture == "sd2":
            # SD2 uses the penultimate layer: diffusers' text encoder has one layer less than the
            # OpenCLIP tower and no text_projection.
            if rest == "text_projection":
                return True
            m = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
            if m and int(m.group(1)) >= int(config.get("num_hidden_layers", 0)):
                return True
    return False


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def ldm_to_diffusers(
    *,
    state_dict: Mapping[str, torch.Tensor],
    architecture: str,
    config_dir: str | Path,
) -> dict[str, dict[str, torch.Tensor]]:
    """Convert an LDM-named state dict to diffusers component state dicts.

    Returns ``{"unet": ..., "vae": ..., "text_encoder": ..., "text_encoder_2": ...}`` holding only
    the components that have keys in ``state_dict``; each dict has exactly the keys of the model's
    ``state_dict()`` as built by the installed diffusers / transformers from the configs in
    ``config_dir`` (a diffusers folder or config folder: ``unet/config.json``, ``vae/config.json``,
    ``text_encoder/config.json``, ``text_encoder_2/config.json``).

    The conversion itself is diffusers' (``convert_ldm_unet_checkpoint``,
    ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
    ``convert_open_clip_checkpoint``); renamed tensors are passed through without copies. Before
    converting, every component's keys and shapes are checked against the model built from its
    config on the meta device: a missing key, an unexpected key or a shape mismatch raises
    :class:`CheckpointError` naming the key. Keys known to have no diffusers counterpart are dropped
    (``position_ids``, OpenCLIP ``logit_scale``, and SD2's last OpenCLIP layer and
    ``text_projection``, which diffusers' SD2 text encoder does not have); keys outside the
    model-weight prefixes (``alphas_cumprod``, ``model_ema.*`` ...) are ignored.
    """
    from diffusers.loaders import single_file_utils as sfu

    prefixes = _check_architecture(architecture)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component = component_of(key, architecture=architecture)
        if component is not None:
            parts.setdefault(component, {})[key] = tensor
    if not parts:
        raise CheckpointError(f"no {architecture} model weights in the state dict (no key starts with {UNET_PREFIX!r} ...)")
    configs = load_component_configs(config_dir)

    result: dict[str, dict[str, torch.Tensor]] = {}
    for component in prefixes:
        if component not in parts:
            continue
        part = parts[component]
        prefix, text_format = prefixes[component]
        config = configs.get(component)
        if config is None:
            raise CheckpointError(f"{config_dir}: no {_CONFIG_FILES[component]} for the {component} keys (e.g. {next(iter(part))!r})")
        model = empty_model(component, config)
        expected_diffusers = model.state_dict()
        expected = diffusers_to_ldm(
            components={component: expected_diffusers},
            architecture=architecture,
            unet_config=config if component == "unet" else None,
            vae_config=config if component == "vae" else None,
        )
        for key, tensor in part.items():
            if key not in expected:
                if _droppable(key, prefix=prefix, text_format=text_format, config=config, architecture=architecture):
                    continue
                raise CheckpointError(f"{component}: unexpected key {key!r} for the {component} config in {config_dir}")
            if _shape(tensor) != _shape(expected[key]):
                raise CheckpointError(
                    f"{component}: key {key!r} has shape {_shape(tensor)}, the config in {config_dir} "
                    f"expects {_shape(expected[key])}"
                )
        missing = [k for k in expected if k not in part]
        if missing:
            raise CheckpointError(
                f"{component}: missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
        checkpoint = {k: part[k] for k in expected}  # expected keys only, in model order
        if component == "unet":
            converted = sfu.convert_ldm_unet_checkpoint(checkpoint, dict(config))
        elif component == "vae":
            converted = sfu.convert_ldm_vae_checkpoint(checkpoint, dict(config))
        elif text_format == "hf":
            converted = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=prefix)
        else:
            converted = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
        if text_format is not None and not hasattr(model, "text_model"):
            # CLIPTextModel is flattened in transformers >= 5.6, as diffusers' own loader does
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        extra = [k for k in converted if k not in expected_diffusers]
        lost = [k for k in expected_diffusers if k not in converted]
        if extra or lost:
            detail = f"unexpected {extra[0]!r}" if extra else f"missing {lost[0]!r}"
            raise CheckpointError(f"{component}: diffusers' converter produced a state dict that does not fit the model: {detail}")
        result[component] = {k: converted[k] for k in expected_diffusers}
    return result
