"""Canonical checkpoint keys <-> diffusers pipeline modules, for every architecture record.

SD1 / SD2 / SDXL (records whose modules use the LDM schemes) go through :mod:`optimizer.checkpoint.keymap`
(diffusers' LDM converters). DiT architectures (Flux, SD3) list their modules in the record, each
with a prefix and a scheme:

* ``rename``: HF text encoders (CLIP, T5) are stored under a prefix with HF names. CLIP keys carry
  ``text_model.`` in files; transformers >= 5.6 drops it for ``CLIPTextModel``. T5's
  ``encoder.embed_tokens.weight`` is tied to ``shared.weight`` and not stored.
* ``ldm_vae``: diffusers' own ``convert_ldm_vae_checkpoint`` (inverse: keymap's VAE mapping).
* ``key_rules``: the record's key rules (:mod:`optimizer.checkpoint.key_rules`).

:func:`to_diffusers` checks every converted module against the model built from its config on the
meta device: a missing, unexpected or mis-shaped key raises :class:`CheckpointError` naming it.
It also returns which tensors are *new* (not the canonical tensors or views of them), so that a
render binding can refresh exactly those after a merge.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimizer.architectures.layout import BlockLayout
from optimizer.checkpoint.key_rules import KeyRules
from optimizer.checkpoint.types import CheckpointError

__all__ = ["Converted", "build_empty_module", "empty_modules", "from_diffusers", "module_configs", "recompute", "to_diffusers"]

_VAE_PREFIX = "first_stage_model."
_T5_TIED = "encoder.embed_tokens.weight"


@dataclass(frozen=True)
class Converted:
    """Diffusers state dicts per module, and per module the keys whose tensors are new (not the
    canonical tensors or views of them), each with the canonical key it is computed from."""

    modules: dict[str, dict[str, Tensor]]
    new: dict[str, dict[str, str]]


@cache
def _rules(layout_name: str) -> KeyRules:
    from optimizer.architectures.layout import load_layout

    return KeyRules(load_layout(layout_name).spec.key_rules)


def rules_of(layout: BlockLayout) -> KeyRules:
    """The key rules (which key belongs to which block) shipped for ``layout``'s name, else those the layout declares."""
    try:
        return _rules(layout.name)
    except Exception:  # noqa: BLE001 - a layout parsed from text, not shipped
        return KeyRules(layout.spec.key_rules)


def _class(path: str):
    package, _, name = path.partition(".")
    try:
        return getattr(importlib.import_module(package), name)
    except (ImportError, AttributeError) as exc:
        raise CheckpointError(f"the installed {package} has no {name} ({exc})") from None


def module_configs(config_dir: str | Path, layout: BlockLayout) -> dict[str, dict[str, Any]]:
    """The ``<module>/config.json`` files of ``config_dir`` for the record's modules (those present)."""
    root = Path(config_dir)
    configs: dict[str, dict[str, Any]] = {}
    for module in layout.spec.modules:
        path = root / module.name / "config.json"
        if path.is_file():
            try:
                configs[module.name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot read config: {exc}") from exc
    return configs


def build_empty_module(cls_path: str, config: Mapping[str, Any], *, name: str) -> torch.nn.Module:
    """``cls_path`` (``diffusers.X`` / ``transformers.X``) built from ``config`` with meta parameters."""
    from accelerate import init_empty_weights

    cls = _class(cls_path)
    try:
        with init_empty_weights():
            if cls_path.startswith("transformers."):
                config_cls = cls.config_class
                cfg = config_cls.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
                return cls(cfg)
            return cls.from_config(dict(config))
    except Exception as exc:  # noqa: BLE001 - any config error of the libraries
        raise CheckpointError(f"{name} config cannot build a {cls.__name__}: {type(exc).__name__}: {exc}") from exc


def _check_fit(converted: Mapping[str, Tensor], expected: Mapping[str, Tensor], *, name: str, source: str) -> None:
    for key, tensor in converted.items():
        if key not in expected:
            raise CheckpointError(f"{name}: unexpected key {key!r} for the {name} config in {source}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{name}: key {key!r} has shape {tuple(tensor.shape)}, the config in {source} expects {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in converted]
    if missing:
        raise CheckpointError(f"{name}: missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def _expected_keys(model: torch.nn.Module, cls_path: str) -> dict[str, Tensor]:
    expected = dict(model.state_dict())
    if cls_path == "transformers.T5EncoderModel":
        expected.pop(_T5_TIED, None)
    return expected


def _rename_to_module(part: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, tensor in part.items():
        if key not in expected and key.startswith("text_model.") and key.removeprefix("text_model.") in expected:
            key = key.removeprefix("text_model.")
        out[key] = tensor
    return out


def to_diffusers(*, state_dict: Mapping[str, Tensor], layout: BlockLayout, config_dir: str | Path) -> Converted:
    """The diffusers state dicts of the modules that have keys in the canonical ``state_dict``."""
    if layout.ldm:
        return _sd_to_diffusers(state_dict=state_dict, layout=layout, config_dir=config_dir)
    from diffusers.loaders import single_file_utils as sfu

    configs = module_configs(config_dir, layout)
    modules: dict[str, dict[str, Tensor]] = {}
    new: dict[str, dict[str, str]] = {}
    for module in layout.spec.modules:
        part = {k[len(module.prefix):]: v for k, v in state_dict.items() if k.startswith(module.prefix)}
        if not part:
            continue
        config = configs.get(module.name)
        if config is None:
            raise CheckpointError(f"{config_dir}: no {module.name}/config.json for the {module.name} keys (e.g. {module.prefix + next(iter(part))!r})")
        expected = _expected_keys(build_empty_module(module.cls, config, name=module.name), module.cls)
        fresh: dict[str, str] = {}
        if module.scheme == "rename":
            converted = _rename_to_module(part, expected)
        elif module.scheme == "ldm_vae":
            converted = sfu.convert_ldm_vae_checkpoint({_VAE_PREFIX + k: v for k, v in part.items()}, dict(config))
        else:
            converted, fresh = rules_of(layout).to_diffusers(part)
        _check_fit(converted, expected, name=module.name, source=str(config_dir))
        modules[module.name] = {k: converted[k] for k in expected}
        new[module.name] = {k: module.prefix + v for k, v in fresh.items()}
    if not modules:
        raise CheckpointError(f"no {layout.name} module weights in the state dict (no key starts with {layout.spec.modules[0].prefix!r})")
    return Converted(modules=modules, new=new)


def _sd_to_diffusers(*, state_dict, layout: BlockLayout, config_dir) -> Converted:
    """SD1 / SD2 / SDXL through keymap; OpenCLIP towers bound as views (diffusers' converter
    clones q/k/v and makes ``text_projection`` contiguous: views of the canonical tensors instead)."""
    from optimizer.checkpoint.keymap import COMPONENT_PREFIXES
    from optimizer.checkpoint.keymap_diffusers import ldm_to_diffusers

    modules = ldm_to_diffusers(state_dict=state_dict, architecture=layout.name, config_dir=config_dir)
    for component, (prefix, text_format) in COMPONENT_PREFIXES[layout.name].items():
        if text_format != "openclip" or component not in modules:
            continue
        _openclip_views(modules[component], state_dict, prefix=prefix)
    return Converted(modules=modules, new={name: {} for name in modules})


def _openclip_views(converted: dict[str, Tensor], state_dict: Mapping[str, Tensor], *, prefix: str) -> None:
    """Replace diffusers' cloned q/k/v (and contiguous ``text_projection``) by views of the LDM tensors."""
    flat = not any(k.startswith("text_model.") for k in converted)
    lead = "" if flat else "text_model."
    layer = 0
    while f"{prefix}transformer.resblocks.{layer}.attn.in_proj_weight" in state_dict:
        base = f"{lead}encoder.layers.{layer}.self_attn."
        if f"{base}q_proj.weight" not in converted:
            break  # SD2's unused last OpenCLIP layer
        for param, ldm in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            fused = state_dict[f"{prefix}transformer.resblocks.{layer}.attn.{ldm}"]
            width = fused.shape[0] // 3
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                key = f"{base}{proj}.{param}"
                if fused.device.type != "meta" and not torch.equal(converted[key], fused[i * width : (i + 1) * width]):
                    raise CheckpointError(f"{key}: the OpenCLIP q/k/v split does not match diffusers' conversion")
                converted[key] = fused[i * width : (i + 1) * width]
        layer += 1
    projection = state_dict.get(f"{prefix}text_projection")
    if projection is not None and "text_projection.weight" in converted:
        converted["text_projection.weight"] = projection.T


def recompute(*, layout: BlockLayout, canonical_key: str, diffusers_key: str, tensor: Tensor) -> Tensor:
    """The diffusers tensor ``diffusers_key`` computed again from its canonical tensor (after a merge)."""
    module = next(m for m in layout.spec.modules if canonical_key.startswith(m.prefix))
    converted, _ = rules_of(layout).to_diffusers({canonical_key[len(module.prefix):]: tensor})
    return converted[diffusers_key]


def empty_modules(*, layout: BlockLayout, config_dir: str | Path, names) -> dict[str, torch.nn.Module]:
    """The pipeline modules ``names`` built from ``config_dir``'s configs with meta parameters."""
    if not layout.ldm:
        configs = module_configs(config_dir, layout)
        classes = {m.name: m.cls for m in layout.spec.modules}
        return {n: build_empty_module(classes[n], configs[n], name=n) for n in names}
    from optimizer.checkpoint.keymap_diffusers import empty_model, load_component_configs

    configs = load_component_configs(config_dir)
    return {n: empty_model(n, configs[n]) for n in names}


def from_diffusers(*, modules: Mapping[str, Mapping[str, Tensor]], layout: BlockLayout, configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
    """The canonical state dict of diffusers module state dicts (the inverse of :func:`to_diffusers`).

    ``configs`` holds each module's config (the VAE's fixes its number of levels)."""
    if layout.ldm:
        from optimizer.checkpoint.keymap import diffusers_to_ldm

        return diffusers_to_ldm(
            components=modules, architecture=layout.name, unet_config=configs.get("unet"), vae_config=configs.get("vae")
        )
    from optimizer.checkpoint.keymap import _vae_convert

    known = {m.name: m for m in layout.spec.modules}
    out: dict[str, Tensor] = {}
    for name, sd in modules.items():
        module = known.get(name)
        if module is None:
            raise CheckpointError(f"{layout.name} has no module {name!r}; expected one of {', '.join(known)}")
        if module.scheme == "rename":
            clip = module.cls.startswith("transformers.CLIPText")
            for key, tensor in sd.items():
                if module.cls == "transformers.T5EncoderModel" and key == _T5_TIED:
                    continue
                if clip and key in ("text_model.embeddings.position_ids", "embeddings.position_ids"):
                    continue
                if clip and not key.startswith("text_model.") and key != "text_projection.weight":
                    key = "text_model." + key
                out[module.prefix + key] = tensor
        elif module.scheme == "ldm_vae":
            config = configs.get(name) or {}
            n_up = len(config.get("up_block_types") or config.get("block_out_channels") or [])
            if n_up == 0:
                raise CheckpointError(f"{name} config: no up_block_types")
            for key, tensor in sd.items():
                ldm, value = _vae_convert(key, tensor, n_up)
                out[module.prefix + ldm] = value
        else:
            for key, tensor in rules_of(layout).from_diffusers(sd).items():
                out[module.prefix + key] = tensor
    return out
