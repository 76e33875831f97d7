"""Reading LoRA files of the common formats into one neutral form: ``(component, module) -> factors``.

Formats (detected from the keys; one file is one format):

=====================  =============================================================  ===========
format                 keys (per adapted module ``M``)                                alpha
=====================  =============================================================  ===========
``kohya``              ``lora_unet_<M with _>.lora_down.weight`` / ``.lora_up.weight``  ``.alpha``
                       ``lora_te_`` (SD1/SD2 text encoder), ``lora_te1_``/``lora_te2_``
                       (SDXL); ``M`` in diffusers or in LDM naming
``peft``               ``[unet.|text_encoder.|text_encoder_2.]M.lora_A.weight`` /       metadata
                       ``.lora_B.weight`` (diffusers >= 0.22, PEFT)                    or rank
``diffusers``          ``[unet.|text_encoder.]M.lora.down.weight`` / ``.lora.up.weight``  ``.alpha``
                       (also ``.lora_linear_layer.``)                                   or rank
``diffusers-attnproc`` ``<attention>.processor.to_{q,k,v,out}_lora.down.weight``        rank
                       (the old ``LoRAAttnProcessor`` files, UNet only)
=====================  =============================================================  ===========

A module's update is ``delta W = (alpha / rank) * up @ down`` (kohya ``merge_lora.py``; for a conv
``down`` is ``[rank, in, kh, kw]`` and ``up`` ``[out, rank, 1, 1]``, flattened to matrices).
Without an alpha the scale is 1 (PEFT's and diffusers' default ``lora_alpha = rank``).

Not supported, with an error naming the key: LyCORIS LoHa/LoKr (``hada_``/``lokr_``), LoCon's CP
decomposition (``lora_mid``), DoRA (``dora_scale``/``lora_magnitude_vector``). Files are read with
the safetensors library or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from optimizer.checkpoint.safe_read import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_pickle_weights_only, read_safetensors
from optimizer.checkpoint.types import CheckpointError
from optimizer.errors import EvomergeError

__all__ = ["LoraError", "LoraFactors", "ParsedLora", "parse_lora", "read_lora_file"]


class LoraError(EvomergeError, ValueError):
    """A LoRA file that cannot be read, parsed or mapped onto the model (the message names the key)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: ``delta W = scale * up @ down`` with ``scale = alpha / rank`` (1 without alpha)."""

    component: str  # "unet", "text_encoder", "text_encoder_2" or "kohya" (a flat kohya name, resolved later)
    module: str  # module path in the component (``down_blocks.0.attentions.0...attn1.to_k``) or the kohya name
    down: Tensor  # [rank, in] or [rank, in, kh, kw]
    up: Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float | None
    source_key: str  # the file's key of ``down`` (for messages)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA file in neutral form."""

    path: Path
    format: str
    layers: tuple[LoraFactors, ...]
    metadata: dict[str, str]


_UNSUPPORTED = (
    (re.compile(r"\.hada_|\.lokr_"), "LyCORIS LoHa/LoKr"),
    (re.compile(r"\.lora_mid\."), "LoCon with CP decomposition (lora_mid)"),
    (re.compile(r"dora_scale|lora_magnitude_vector"), "DoRA"),
)
_KOHYA = re.compile(r"^(?P<name>lora_(?:unet|te|te1|te2|te3)_[A-Za-z0-9_]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?P<name>.+)\.(?P<role>lora_A|lora_B)(?:\.default)?\.weight$")
_DIFFUSERS = re.compile(r"^(?P<name>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(?P<name>.+)\.alpha$")
_ATTNPROC = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def read_lora_file(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file (safetensors, or a weights-only pickle)."""
    path = Path(path)
    if not path.exists():
        raise LoraError(f"no LoRA file at {path}")
    try:
        if path.suffix in SAFETENSORS_SUFFIXES:
            return read_safetensors(path)
        if path.suffix in PICKLE_SUFFIXES:
            return read_pickle_weights_only(path), {}
    except CheckpointError as exc:
        raise LoraError(str(exc)) from None
    raise LoraError(f"{path}: unknown LoRA file type {path.suffix!r}; expected .safetensors, {', '.join(PICKLE_SUFFIXES)}")


def detect_format(keys: list[str], *, source: str) -> str:
    """``kohya``, ``peft``, ``diffusers`` or ``diffusers-attnproc`` (see the module docstring)."""
    if not keys:
        raise LoraError(f"{source}: the file holds no tensors")
    for key in keys:
        for pattern, what in _UNSUPPORTED:
            if pattern.search(key):
                raise LoraError(f"{source}: {what} is not supported (key {key!r}); only plain LoRA (down/up) and LoCon")
    found = []
    if any(k.startswith("lora_") for k in keys):
        found.append("kohya")
    if any(_PEFT.match(k) for k in keys):
        found.append("peft")
    if any(_ATTNPROC.match(k) for k in keys):
        found.append("diffusers-attnproc")
    elif any(_DIFFUSERS.match(k) for k in keys):
        found.append("diffusers")
    if len(found) != 1:
        what = "mixes " + " and ".join(found) if found else "is no known LoRA format"
        raise LoraError(f"{source}: the file {what} (e.g. key {keys[0]!r}); expected kohya, PEFT or diffusers LoRA keys")
    return found[0]


def _split_component(name: str) -> tuple[str, str]:
    """``unet.down_blocks...`` -> ``("unet", "down_blocks...")``; no prefix means the UNet."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    head, _, rest = name.partition(".")
    if head in _COMPONENTS and rest:
        return head, rest
    return "unet", name


def _alpha_value(tensor: Tensor, key: str, source: str) -> float:
    if tensor.numel() != 1 or not torch.isfinite(tensor).all():
        raise LoraError(f"{source}: {key} must be one finite number, got shape {tuple(tensor.shape)}")
    return float(tensor.reshape(()).item())


def _metadata_alphas(metadata: dict[str, str], source: str) -> dict[str, float]:
    """PEFT/diffusers alphas stored in safetensors metadata (``lora_adapter_metadata``), per component."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LoraError(f"{source}: metadata lora_adapter_metadata is not JSON: {exc}") from None
    out: dict[str, float] = {}
    for key, value in data.items():
        # {"unet.lora_alpha": 4, "unet.r": 4, ...} or {"lora_alpha": 4, ...}
        component, _, field = key.rpartition(".")
        if field == "lora_alpha" and isinstance(value, (int, float)):
            out[component or "unet"] = float(value)
        if field == "alpha_pattern" and value:
            raise LoraError(f"{source}: per-module alphas (metadata {key}) are not supported")
    return out


def parse_lora(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None, *, source: str = "<lora>") -> ParsedLora:
    """The neutral form of a LoRA state dict (see the module docstring); every key must be used."""
    metadata = dict(metadata or {})
    keys = sorted(tensors)
    fmt = detect_format(keys, source=source)
    pairs: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    alphas: dict[tuple[str, str], float] = {}
    unused: list[str] = []
    for key in keys:
        tensor = tensors[key]
        if fmt == "kohya":
            m = _KOHYA.match(key)
            if not m:
                unused.append(key)
                continue
            where = ("kohya", m.group("name"))
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group("role")]
        elif fmt == "peft":
            m = _PEFT.match(key)
            if not m:
                unused.append(key)
                continue
            where = _split_component(m.group("name"))
            role = "down" if m.group("role") == "lora_A" else "up"
        elif fmt == "diffusers":
            m = _DIFFUSERS.match(key)
            if m:
                where, role = _split_component(m.group("name")), m.group("role")
            elif a := _DIFFUSERS_ALPHA.match(key):
                where, role = _split_component(a.group("name")), "alpha"
            else:
                unused.append(key)
                continue
        else:
            m = _ATTNPROC.match(key)
            if not m:
                unused.append(key)
                continue
            proj = "to_out.0" if m.group("proj") == "to_out" else m.group("proj")
            where, role = ("unet", f"{m.group('attn')}.{proj}"), m.group("role")
            if where[1].startswith("unet."):
                where = ("unet", where[1][len("unet.") :])
        if role == "alpha":
            alphas[where] = _alpha_value(tensor, key, source)
        else:
            slot = pairs.setdefault(where, {})
            if role in slot:
                raise LoraError(f"{source}: keys {slot[role][0]!r} and {key!r} are the same LoRA factor")
            slot[role] = (key, tensor)
    if unused:
        raise LoraError(f"{source}: {len(unused)} key(s) of this {fmt} LoRA are not LoRA factors, e.g. {unused[:3]}")
    meta_alpha = _metadata_alphas(metadata, source)
    layers: list[LoraFactors] = []
    for where, slot in sorted(pairs.items()):
        if set(slot) != {"down", "up"}:
            have = next(iter(slot.values()))[0]
            missing = "up" if "down" in slot else "down"
            raise LoraError(f"{source}: {have!r} has no matching {missing} factor")
        (down_key, down), (_, up) = slot["down"], slot["up"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{source}: {down_key}: factors do not chain: down {tuple(down.shape)}, up {tuple(up.shape)}"
            )
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise LoraError(f"{source}: {down_key}: a conv LoRA's up factor must be 1x1, got {tuple(up.shape)}")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraError(f"{source}: {down_key}: factors hold NaN or inf")
        alpha = alphas.pop(where, None)
        if alpha is None:
            alpha = meta_alpha.get(where[0])
        layers.append(LoraFactors(component=where[0], module=where[1], down=down, up=up, alpha=alpha, source_key=down_key))
    if alphas:
        stray = sorted(alphas)[0]
        raise LoraError(f"{source}: an alpha for {stray[1]!r} has no LoRA factors")
    return ParsedLora(path=Path(source), format=fmt, layers=tuple(layers), metadata=metadata)
