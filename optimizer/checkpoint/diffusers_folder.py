"""Reading and writing diffusers pipeline folders in the project's LDM key space.

A diffusers folder holds ``model_index.json`` and one sub-folder per component (``unet/``,
``vae/``, ``text_encoder/``, ``text_encoder_2/``, tokenizers, scheduler), each with a
``config.json`` and its weights. :func:`read_diffusers_folder` returns the LDM-named state dict;
:func:`write_diffusers_folder` writes a folder that ``StableDiffusionPipeline.from_pretrained``
(or ``StableDiffusionXLPipeline``) loads with ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from optimizer.atomic import atomic_folder, check_output
from optimizer.checkpoint.keymap import COMPONENT_PREFIXES, diffusers_to_ldm
from optimizer.checkpoint.keymap_diffusers import ldm_to_diffusers
from optimizer.checkpoint.types import CheckpointError

__all__ = ["detect_folder_architecture", "read_diffusers_folder", "write_diffusers_folder"]

_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "text_encoder_3": "model",
}
_BIN_STEMS = {
    "unet": "diffusion_pytorch_model",
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "pytorch_model",
    "text_encoder_2": "pytorch_model",
    "text_encoder_3": "pytorch_model",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def detect_folder_architecture(configs: Mapping[str, Mapping[str, Any]], *, source: str = "diffusers folder") -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from a diffusers folder's configs.

    ``configs`` holds ``model_index`` and the component configs (``unet``, ``text_encoder``, ...).
    SDXL: a ``text_encoder_2`` or a UNet with the ``text_time`` addition embedding. SD2 vs SD1:
    the text encoder is an OpenCLIP tower converted to HF CLIP (``hidden_act`` ``gelu``; OpenAI's
    CLIP-L uses ``quick_gelu``); without a text encoder, a 1024-wide cross-attention or linear
    ``proj_in`` means SD2.
    """
    unet = configs.get("unet")
    if unet is None:
        raise CheckpointError(f"{source}: no unet/config.json")
    index = configs.get("model_index") or {}
    cls = str(index.get("_class_name", ""))
    if "text_encoder_2" in configs or unet.get("addition_embed_type") == "text_time" or "XL" in cls:
        return "sdxl"
    text = configs.get("text_encoder")
    if text is not None:
        return "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    if unet.get("cross_attention_dim") == 1024 or unet.get("use_linear_projection"):
        return "sd2"
    return "sd1"


def _weight_file(folder: Path, component: str) -> list[Path]:
    """The weight file(s) of a component folder, by preference: full-precision safetensors, fp16
    safetensors (each possibly sharded with an index), then ``.bin`` (same order)."""
    stems = (_WEIGHT_STEMS[component], _BIN_STEMS[component])
    candidates = []
    for ext, stem in (("safetensors", stems[0]), ("bin", stems[1])):
        candidates.append((folder / f"{stem}.{ext}", folder / f"{stem}.{ext}.index.json"))
        # diffusers / transformers name a sharded variant's index "<stem>.<ext>.index.fp16.json"
        candidates.append((folder / f"{stem}.fp16.{ext}", folder / f"{stem}.{ext}.index.fp16.json"))
        candidates.append((folder / f"{stem}.fp16.{ext}", folder / f"{stem}.fp16.{ext}.index.json"))
    for single, index in candidates:
        if single.is_file():
            return [single]
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            shards = []
            for name in dict.fromkeys(weight_map.values()):
                shard = folder / str(name)
                if shard.parent != folder or not shard.is_file():
                    raise CheckpointError(f"{index}: shard {name!r} is missing")
                shards.append(shard)
            return shards
    raise CheckpointError(
        f"{folder}: no weights ({stems[0]}.safetensors, {stems[0]}.fp16.safetensors or {stems[1]}.bin)"
    )


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from optimizer.checkpoint.safe_read import check_weight_file, unpickler_reason

    check_weight_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise CheckpointError(f"{path}: cannot read safetensors: {exc}") from exc
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused or corrupt
        raise CheckpointError(f"{path}: cannot read with torch.load(weights_only=True): {unpickler_reason(exc)}") from exc
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return dict(data)


def read_diffusers_folder(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str, dict[str, dict[str, Any]]]:
    """Read a diffusers SD1 / SD2 / SDXL folder as ``(LDM state dict, architecture, configs)``.

    Weights of ``unet/``, ``vae/``, ``text_encoder/`` and ``text_encoder_2/`` are read from
    ``diffusion_pytorch_model.safetensors`` / ``model.safetensors``, else their ``.fp16`` variants,
    else sharded ``*.safetensors.index.json``, else ``.bin`` files (only through
    ``torch.load(weights_only=True)``). The architecture comes from :func:`detect_folder_architecture`.
    ``configs`` holds ``model_index`` and each present component's ``config.json``. The UNet is
    required; other components are included when their folder exists. Keys are converted with
    :func:`~optimizer.checkpoint.keymap.diffusers_to_ldm`; every error is a :class:`CheckpointError`.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder")
    configs: dict[str, dict[str, Any]] = {}
    if (root / "model_index.json").is_file():
        configs["model_index"] = _read_json(root / "model_index.json")
    for component in _WEIGHT_STEMS:
        config_path = root / component / "config.json"
        if config_path.is_file():
            configs[component] = _read_json(config_path)
    if "unet" not in configs and "transformer" in configs:
        return _read_dit_folder(root, configs)
    if "unet" not in configs:
        raise CheckpointError(f"{root}: not a diffusers Stable Diffusion folder (no unet/ or transformer/config.json)")
    architecture = detect_folder_architecture(configs, source=str(root))
    components: dict[str, dict[str, torch.Tensor]] = {}
    for component in COMPONENT_PREFIXES[architecture]:
        if component in configs:
            components[component] = _read_module(root, component)
    state_dict = diffusers_to_ldm(
        components=components,
        architecture=architecture,
        unet_config=configs["unet"],
        vae_config=configs.get("vae"),
    )
    return state_dict, architecture, configs


def _read_module(root: Path, name: str) -> dict[str, torch.Tensor]:
    """The weights of module folder ``root / name`` (all shards; a key in two shards is an error)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_file(root / name, name):
        for key, value in _load_weights(file).items():
            if key in tensors:
                raise CheckpointError(f"{file}: key {key!r} appears in two shards")
            tensors[key] = value
    return tensors


def _dit_record(configs: Mapping[str, Mapping[str, Any]], *, source: str):
    """The architecture record whose denoiser class is ``transformer/config.json``'s and whose
    block count it has (SD3 24 vs SD3.5 Large 38 joint blocks)."""
    from optimizer.architectures.layout import available_layouts, load_layout

    cls = str(configs["transformer"].get("_class_name", ""))
    layers = configs["transformer"].get("num_layers")
    found = []
    for name in available_layouts():
        layout = load_layout(name)
        denoiser = next((m for m in layout.spec.modules if m.name == "transformer"), None)
        if denoiser is None or denoiser.cls.rpartition(".")[2] != cls:
            continue
        expect = {b.split(".")[0] for b in layout.blocks if "." in b}
        counts = {p: sum(1 for b in layout.blocks if b.startswith(p + ".")) for p in expect}
        if "joint_blocks" in counts and counts["joint_blocks"] != layers:
            continue
        found.append(layout)
    if len(found) != 1:
        raise CheckpointError(f"{source}: transformer {cls} with {layers} layers is no known architecture")
    return found[0]


def _read_dit_folder(root: Path, configs: dict[str, dict[str, Any]]) -> tuple[dict[str, torch.Tensor], str, dict[str, dict[str, Any]]]:
    """A Flux / SD3 diffusers folder as ``(canonical state dict, architecture, configs)``."""
    from optimizer.checkpoint.convert import from_diffusers

    layout = _dit_record(configs, source=str(root))
    modules = {}
    for module in layout.spec.modules:
        if module.name in configs:
            modules[module.name] = _read_module(root, module.name)
    state_dict = from_diffusers(modules=modules, layout=layout, configs=configs)
    return state_dict, layout.name, configs


def _saveable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (what ``safetensors.save_file`` accepts)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for key, tensor in tensors.items():
        t = tensor.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        storage = (str(t.device), t.untyped_storage().data_ptr())
        if storage in seen and t.numel() > 0:
            t = t.clone()
            storage = (str(t.device), t.untyped_storage().data_ptr())
        seen.add(storage)
        out[key] = t
    return out


def _set_config_dtype(config_path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Make a transformers config's dtype describe the saved weights (transformers >= 5 loads in
    the config dtype by default)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        return
    name = str(next(iter(dtypes))).removeprefix("torch.")
    config = _read_json(config_path)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    if all(config.get(k) == name for k in keys):
        return
    for k in keys:
        config[k] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _set_prediction_type(config: Path, prediction_type: str) -> None:
    """Rewrite a scheduler config's ``prediction_type`` (no-op without the file or when it agrees)."""
    if not config.is_file():
        return
    doc = json.loads(config.read_text(encoding="utf-8"))
    if doc.get("prediction_type") != prediction_type:
        doc["prediction_type"] = prediction_type
        config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_diffusers_folder(path: Path) -> bool:
    """True for a folder with a ``model_index.json`` (what :func:`write_diffusers_folder` writes)."""
    return (Path(path) / "model_index.json").is_file()


def write_diffusers_folder(
    *,
    state_dict: Mapping[str, torch.Tensor],
    architecture: str,
    path: str | os.PathLike[str],
    config_dir: str | os.PathLike[str],
    overwrite: bool = False,
    prediction_type: str | None = None,
) -> Path:
    """Write an LDM-named state dict as a complete diffusers folder at ``path``; returns ``path``.

    ``config_dir`` is a config folder (:func:`~optimizer.checkpoint.config_dir.diffusers_config_dir`)
    whose component configs match the weights; all its files (``model_index.json``, scheduler,
    tokenizers, component configs) are copied, and each component's weights are converted with
    :func:`~optimizer.checkpoint.keymap_diffusers.ldm_to_diffusers` and saved as
    ``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` (HF CLIP text encoders with
    the classic ``text_model.*`` key names, which every transformers version loads; their
    ``config.json`` dtype is set to the saved weights' dtype). The result
    loads with ``StableDiffusionPipeline.from_pretrained(path, local_files_only=True)`` (SDXL:
    ``StableDiffusionXLPipeline``).

    The folder is written to a temporary folder next to ``path`` and renamed into place; on any
    error nothing is left behind. An existing ``path`` is an error unless ``overwrite`` is true
    (then it is replaced only after the new folder is complete, and only if it is a diffusers
    folder: ``--overwrite`` never deletes a folder of other files). Every component of the
    architecture must be present in ``state_dict``. ``prediction_type`` (the parents', where known)
    is written into ``scheduler/scheduler_config.json`` when it differs from the config folder's.
    """
    target = Path(path)
    config_root = Path(config_dir)
    if not (config_root / "model_index.json").is_file():
        raise CheckpointError(f"{config_root}: not a diffusers config folder (no model_index.json)")
    check_output(target, overwrite=overwrite, folder=True, replaceable=is_diffusers_folder, what="diffusers folder")
    from optimizer.architectures.layout import load_layout

    layout = load_layout(architecture)
    reused: list[str] = []
    if not layout.ldm:
        from optimizer.checkpoint.convert import to_diffusers

        components = to_diffusers(state_dict=state_dict, layout=layout, config_dir=config_root).modules
        for module in layout.spec.modules:
            if module.name in components:
                continue
            try:
                _weight_file(config_root / module.name, module.name)
            except CheckpointError:
                raise CheckpointError(
                    f"cannot write a complete diffusers folder: the weights have no {module.name} ({module.prefix}*) "
                    f"and {config_root} has no {module.name} weights to take it from"
                ) from None
            reused.append(module.name)  # the config folder's own weights (a local snapshot)
    else:
        components = ldm_to_diffusers(state_dict=state_dict, architecture=architecture, config_dir=config_root)
        missing = [c for c in COMPONENT_PREFIXES[architecture] if c not in components]
        if missing:
            prefixes = ", ".join(COMPONENT_PREFIXES[architecture][c][0] for c in missing)
            raise CheckpointError(
                f"cannot write a complete diffusers folder: the state dict has no {', '.join(missing)} ({prefixes}*)"
            )
    from safetensors.torch import save_file

    with atomic_folder(target) as tmp:
        for source in sorted(config_root.rglob("*")):
            rel = source.relative_to(config_root)
            if source.is_dir() or rel.name.startswith("."):
                continue
            if rel.parts[0] in components and rel.name != "config.json":
                continue  # weights of a module written below (a snapshot's own copy is not wanted)
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        if prediction_type is not None:
            _set_prediction_type(tmp / "scheduler" / "scheduler_config.json", prediction_type)
        for component, tensors in components.items():
            folder = tmp / component
            if not (folder / "config.json").is_file():
                raise CheckpointError(f"{config_root}: no {component}/config.json")
            clip = layout.ldm or any(m.name == component and m.cls.startswith("transformers.CLIPText") for m in layout.spec.modules)
            if component.startswith("text_encoder") and clip:
                tensors = {
                    (k if k.startswith("text_model.") or k == "text_projection.weight" else "text_model." + k): v
                    for k, v in tensors.items()
                }
            saveable = _saveable(tensors)
            if component.startswith("text_encoder"):
                _set_config_dtype(folder / "config.json", saveable)
            weights = folder / f"{_WEIGHT_STEMS[component]}.safetensors"
            try:
                save_file(saveable, str(weights), metadata={"format": "pt"})
            except Exception as exc:  # noqa: BLE001 - safetensors / OS errors
                raise CheckpointError(f"{target}: cannot write {component} weights: {type(exc).__name__}: {exc}") from exc
    return target
