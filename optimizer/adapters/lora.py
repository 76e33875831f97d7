"""LoRAs mapped onto a checkpoint's LDM keys, and applied in place after a merge.

:func:`load_lora` reads a file of any format of :mod:`optimizer.adapters.lora_format`, maps every
adapted module onto one LDM key of the parents (``model.diffusion_model.input_blocks.1.1...to_k.weight``,
``cond_stage_model.transformer.text_model...k_proj.weight``) and checks the shapes. A module that
does not map is an error that names it: nothing of a LoRA is silently dropped.

:class:`LoraSet` holds the factors of several LoRAs on the merge device (built once per study).
:meth:`LoraSet.apply` adds, for each LoRA ``l`` and each adapted weight ``W`` owned by MBW block ``b``::

    W += strength[l][b] * (alpha_l / rank_l) * up_l @ down_l

in place, one ``addmm_`` per adapted weight (no temporary the size of the model). Because the merge
kernel rewrites every block from the parents on each merge, applying after the merge never
accumulates across trials. ``strength`` per block is the "LoRA block weight" of the webui
extension (:mod:`optimizer.adapters.lbw`); a global strength is the same value in every block.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimizer.adapters.lora_format import LoraError, LoraFactors, parse_lora, read_lora_file
from optimizer.architectures.layout import BlockLayout
from optimizer.checkpoint.hashing import sha256_file
from optimizer.checkpoint.keymap import COMPONENT_PREFIXES, UNET_PREFIX

__all__ = [
    "Lora", "LoraApplyStats", "LoraLayer", "LoraSet", "LoraTargets", "dit_lora_targets", "load_lora", "load_loras", "lora_targets",
    "targets_for_bank",
    "uniform_strengths",
]



def _text_towers(architecture: str) -> list[tuple[str, str, str]]:
    """``[(component, LDM prefix, kohya prefix)]`` of the HF CLIP text towers of ``architecture``
    (from :data:`~optimizer.checkpoint.keymap.COMPONENT_PREFIXES`); OpenCLIP towers keep q/k/v in one
    ``in_proj`` tensor and are not LoRA targets. kohya names one tower ``lora_te_``, two ``lora_te1_``/``lora_te2_``."""
    prefixes = COMPONENT_PREFIXES[architecture]
    towers = [c for c in prefixes if c.startswith("text_encoder")]
    kohya = {"text_encoder": "lora_te_"} if len(towers) == 1 else {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    return [(c, prefixes[c][0], kohya[c]) for c in towers if prefixes[c][1] == "hf"]


#: rows of an update placed into a weight: ``(first row of the weight, first row of up @ down, rows)``
Pieces = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class LoraTargets:
    """``(component, module) -> weight key`` for every module a LoRA may adapt in one model.

    ``pieces`` names the modules that are *part* of a stored weight (DiT architectures: diffusers'
    ``to_q`` is the first third of Flux's fused ``qkv``; ``norm_out.linear`` is Flux's final
    modulation with its halves swapped): where each row range of the update goes."""

    architecture: str
    index: Mapping[tuple[str, str], str]
    shapes: Mapping[str, tuple[int, ...]]
    pieces: Mapping[tuple[str, str], Pieces] = field(default_factory=dict)
    #: weight key -> the kohya name a LoRA file written for this model uses (diffusers module paths
    #: for a UNet and HF text towers, as kohya's sd-scripts; canonical module names for DiT records)
    kohya_names: Mapping[str, str] = field(default_factory=dict)

    def resolve(self, layer: LoraFactors) -> str | None:
        return self.index.get((layer.component, layer.module))

    def pieces_of(self, layer: LoraFactors) -> Pieces | None:
        return self.pieces.get((layer.component, layer.module))


def _kohya(prefix: str, module: str) -> str:
    return prefix + module.replace(".", "_")


def lora_targets(*, architecture: str, shapes: Mapping[str, Sequence[int]], unet_config: Mapping[str, Any]) -> LoraTargets:
    """The target index of a model with LDM keys ``shapes`` (key -> shape) and this UNet config.

    Aliases of each weight: the diffusers module path (``down_blocks.0.attentions.0...to_k``), the
    LDM module path (``input_blocks.1.1...to_k``), both as kohya names (``lora_unet_`` + dots as
    underscores), and for an HF CLIP text tower its module path with and without ``text_model.``
    and the kohya ``lora_te_`` / ``lora_te1_`` name.
    """
    from optimizer.checkpoint.keymap import unet_mapper
    from optimizer.checkpoint.keymap_diffusers import empty_model

    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    index: dict[tuple[str, str], str] = {}
    names: dict[str, str] = {}
    mapper = unet_mapper(unet_config)
    for key in empty_model("unet", unet_config).state_dict():
        if not key.endswith(".weight"):
            continue
        ldm = UNET_PREFIX + mapper(key)
        if ldm not in shapes:
            continue
        diffusers_module = key[: -len(".weight")]
        ldm_module = ldm[len(UNET_PREFIX) : -len(".weight")]
        for module in (diffusers_module, ldm_module):
            index[("unet", module)] = ldm
            index[("kohya", _kohya("lora_unet_", module))] = ldm
        names[ldm] = _kohya("lora_unet_", diffusers_module)
    for component, prefix, kohya_prefix in _text_towers(architecture):
        for ldm in shapes:
            if not (ldm.startswith(prefix) and ldm.endswith(".weight")):
                continue
            module = ldm[len(prefix) : -len(".weight")]
            short = module[len("text_model.") :] if module.startswith("text_model.") else module
            index[(component, module)] = ldm
            index[(component, short)] = ldm
            index[("kohya", _kohya(kohya_prefix, module))] = ldm
            index[("kohya", _kohya(kohya_prefix, short))] = ldm
            names[ldm] = _kohya(kohya_prefix, module)
    return LoraTargets(architecture=architecture, index=index, shapes=shapes, kohya_names=names)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted weight: ``target += strength * scale * up @ down`` (``up``/``down`` as matrices)."""

    target: str
    block: str
    up: Tensor  # [out, rank]
    down: Tensor  # [rank, in * kh * kw]
    scale: float
    pieces: Pieces | None = None  # None: the whole weight


@dataclass(frozen=True)
class Lora:
    """A LoRA mapped onto one model: its layers, the blocks it touches, and its provenance."""

    name: str
    path: Path
    sha256: str
    format: str
    layers: tuple[LoraLayer, ...]

    @property
    def blocks(self) -> tuple[str, ...]:
        """The MBW blocks with at least one adapted weight, in first-seen order."""
        return tuple(dict.fromkeys(layer.block for layer in self.layers))

    @property
    def rank(self) -> int:
        return max((layer.up.shape[1] for layer in self.layers), default=0)

    def to(self, *, device: torch.device | str, dtype: torch.dtype) -> Lora:
        layers = tuple(
            LoraLayer(target=l.target, block=l.block, up=l.up.to(device=device, dtype=dtype), down=l.down.to(device=device, dtype=dtype),
                      scale=l.scale, pieces=l.pieces)
            for l in self.layers
        )
        return Lora(name=self.name, path=self.path, sha256=self.sha256, format=self.format, layers=layers)


def _map_layer(layer: LoraFactors, *, targets: LoraTargets, layout: BlockLayout, source: str) -> LoraLayer:
    target = targets.resolve(layer)
    if target is None:  # the caller collects these
        raise KeyError(layer.source_key)
    shape = targets.shapes[target]
    out_features, in_numel = int(layer.up.shape[0]), int(layer.down[0].numel())
    pieces = targets.pieces_of(layer)
    rows = sum(n for _, _, n in pieces) if pieces else shape[0]
    if rows != out_features or int(torch.Size(shape).numel()) != shape[0] * in_numel:
        raise LoraError(
            f"{source}: {layer.source_key}: the LoRA makes a {out_features} x {in_numel} update, "
            f"but {target} has shape {tuple(shape)} (a LoRA for another architecture?)"
        )
    return LoraLayer(
        target=target,
        block=layout.owner_of(target),
        up=layer.up.reshape(out_features, -1).float(),
        down=layer.down.reshape(layer.down.shape[0], -1).float(),
        scale=layer.scale,
        pieces=pieces,
    )


def load_lora(
    path: str | os.PathLike[str], *, targets: LoraTargets, layout: BlockLayout, name: str | None = None
) -> Lora:
    """Read ``path`` and map every adapted module onto ``targets`` (factors kept in float32 on CPU).

    Raises :class:`~optimizer.adapters.lora_format.LoraError` naming the first unmapped modules (with
    their count), a shape that does not fit, or an unsupported format.
    """
    path = Path(path)
    tensors, metadata = read_lora_file(path)
    parsed = parse_lora(tensors, metadata, source=str(path))
    layers: list[LoraLayer] = []
    unmapped: list[str] = []
    for layer in parsed.layers:
        try:
            layers.append(_map_layer(layer, targets=targets, layout=layout, source=str(path)))
        except KeyError:
            unmapped.append(layer.source_key)
    if unmapped:
        hint = ""
        if targets.architecture in ("sd2", "sdxl") and any("te" in k.split(".")[0] or "text_encoder" in k for k in unmapped):
            hint = " (LoRAs of OpenCLIP text towers are not supported)"
        raise LoraError(
            f"{path}: {len(unmapped)} of {len(parsed.layers)} LoRA modules do not map onto this {targets.architecture} model{hint}, "
            f"e.g. {unmapped[:3]}"
        )
    seen: dict[str, list[tuple[int, int, str]]] = {}  # target -> row ranges adapted, by source key
    for layer, parsed_layer in zip(layers, parsed.layers, strict=True):
        ranges = [(dst, dst + n) for dst, _, n in layer.pieces] if layer.pieces else [(0, targets.shapes[layer.target][0])]
        for start, end, other in seen.get(layer.target, []):
            if any(a < end and start < b for a, b in ranges):  # q/k/v of one fused weight may come apart
                raise LoraError(f"{path}: {other!r} and {parsed_layer.source_key!r} adapt the same weight {layer.target}")
        seen.setdefault(layer.target, []).extend((a, b, parsed_layer.source_key) for a, b in ranges)
    return Lora(name=name or path.stem, path=path, sha256=sha256_file(path), format=parsed.format, layers=tuple(layers))


@dataclass(frozen=True)
class LoraApplyStats:
    seconds: float
    layers: int  # adapted weights updated (non-zero strength)


class LoraSet:
    """Several LoRAs resident on the merge device, applied in place by :meth:`apply`.

    ``views``: ``{LDM key: tensor}`` to update (the merge kernel's output views); every target of
    every LoRA must be there, with the LoRA's shape. Factors are kept in the views' dtype, except
    half precision on CPU, where the update is computed in float32 and rounded once.
    """

    def __init__(self, loras: Sequence[Lora], *, views: Mapping[str, Tensor]) -> None:
        names = [l.name for l in loras]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise LoraError(f"LoRA names must be unique; {duplicates} appear more than once")
        self.views = views
        first = next(iter(views.values()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None else torch.float32
        self._upcast = device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        factor_dtype = torch.float32 if self._upcast else dtype
        for lora in loras:
            for layer in lora.layers:
                if layer.target not in views:
                    raise LoraError(f"LoRA {lora.name!r}: {layer.target} is not a weight of the merged model")
        self.loras: dict[str, Lora] = {l.name: l.to(device=device, dtype=factor_dtype) for l in loras}

    def __repr__(self) -> str:
        return f"LoraSet({', '.join(f'{n} ({len(l.layers)} layers)' for n, l in self.loras.items())})"

    @property
    def names(self) -> list[str]:
        return list(self.loras)

    def blocks(self, name: str) -> tuple[str, ...]:
        return self.loras[name].blocks

    def check(self, strengths: Mapping[str, Mapping[str, float]]) -> None:
        """Raise :class:`LoraError` unless ``strengths`` names only loaded LoRAs and gives a finite
        value for every block each of them touches."""
        for name, per_block in strengths.items():
            if name not in self.loras:
                raise LoraError(f"the recipe names LoRA {name!r}; loaded: {', '.join(self.loras) or 'none'}")
            missing = [b for b in self.loras[name].blocks if b not in per_block]
            if missing:
                raise LoraError(f"the recipe gives LoRA {name!r} no strength for block(s) {missing}")
            bad = {b: v for b, v in per_block.items() if not torch.isfinite(torch.tensor(float(v)))}
            if bad:
                raise LoraError(f"LoRA {name!r}: strengths must be finite, got {bad}")

    def apply(self, strengths: Mapping[str, Mapping[str, float]]) -> LoraApplyStats:
        """Add every named LoRA with its per-block strengths (see the module docstring)."""
        self.check(strengths)
        started = time.perf_counter()
        updated = 0
        with torch.no_grad():
            for name, per_block in strengths.items():
                for layer in self.loras[name].layers:
                    weight = float(per_block[layer.block]) * layer.scale
                    if weight == 0.0:
                        continue
                    view = self.views[layer.target]
                    matrix = view.view(view.shape[0], -1)
                    pieces = layer.pieces or ((0, 0, matrix.shape[0]),)
                    for dst, src, rows in pieces:
                        part, up = matrix.narrow(0, dst, rows), layer.up.narrow(0, src, rows)
                        if self._upcast:
                            part.add_((up @ layer.down).mul_(weight).to(part.dtype))
                        else:
                            part.addmm_(up, layer.down, alpha=weight)
                    updated += 1
        return LoraApplyStats(seconds=time.perf_counter() - started, layers=updated)


def uniform_strengths(loras: Iterable[Lora], strength: float) -> dict[str, dict[str, float]]:
    """``{name: {block: strength}}`` for every block each LoRA touches."""
    return {l.name: dict.fromkeys(l.blocks, float(strength)) for l in loras}


def targets_for_bank(bank: Any, *, unet_config: Mapping[str, Any]) -> LoraTargets:
    """:func:`lora_targets` (or, for DiT records, :func:`dit_lora_targets`) for a bank's weights."""
    shapes = {s.key: s.shape for s in bank.spans}
    if not bank.layout.ldm:
        return dit_lora_targets(layout=bank.layout, shapes=shapes)
    return lora_targets(architecture=bank.layout.name, shapes=shapes, unet_config=unet_config)


def dit_lora_targets(*, layout: BlockLayout, shapes: Mapping[str, Sequence[int]]) -> LoraTargets:
    """The target index of a Flux / SD3 model with canonical keys ``shapes``.

    Aliases of each weight: kohya names of the canonical modules (``lora_unet_double_blocks_0_img_attn_qkv``;
    text encoders ``lora_te1_`` / ``lora_te2_`` / ``lora_te3_`` in record order), the canonical
    module path (with or without ``diffusion_model.``), and the diffusers module paths of the
    record's key rules (``transformer.transformer_blocks.0.attn.to_q``: a row range of ``qkv``,
    found by converting a meta tensor of the weight's shape) and of the text encoders.
    """
    from optimizer.checkpoint.convert import rules_of

    shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}
    rules = rules_of(layout)
    index: dict[tuple[str, str], str] = {}
    names: dict[str, str] = {}
    pieces: dict[tuple[str, str], Pieces] = {}
    towers = [m for m in layout.spec.modules if m.scheme == "rename"]
    denoisers = [m for m in layout.spec.modules if m.scheme == "key_rules"]
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        for module in denoisers:
            if not key.startswith(module.prefix):
                continue
            rel = key[len(module.prefix):]
            name = rel[: -len(".weight")]
            for alias in (("unet", name), ("unet", "diffusion_model." + name), ("kohya", _kohya("lora_unet_", name))):
                index[alias] = key
            names[key] = _kohya("lora_unet_", name)
            meta = torch.empty(shape, device="meta")
            converted, new = rules.to_diffusers({rel: meta})
            for diffusers_key, tensor in converted.items():
                where = (module.name, diffusers_key[: -len(".weight")])
                index[where] = key
                if diffusers_key in new:  # swap_halves: the update's halves go to the other half
                    half = shape[0] // 2
                    pieces[where] = ((half, 0, half), (0, half, half))
                elif tensor.shape[0] != shape[0]:
                    stride = meta.stride(0) if meta.dim() else 1
                    pieces[where] = ((tensor.storage_offset() // stride, 0, int(tensor.shape[0])),)
        for i, module in enumerate(towers, start=1):
            if not key.startswith(module.prefix):
                continue
            name = key[len(module.prefix): -len(".weight")]
            short = name.removeprefix("text_model.")
            for alias in ((module.name, name), (module.name, short), ("kohya", _kohya(f"lora_te{i}_", name)),
                          ("kohya", _kohya(f"lora_te{i}_", short))):
                index[alias] = key
            names[key] = _kohya(f"lora_te{i}_", name)
    return LoraTargets(architecture=layout.name, index=index, shapes=shapes, pieces=pieces, kohya_names=names)


def load_loras(
    specs: Sequence[tuple[str, str | os.PathLike[str]]], *, bank: Any, unet_config: Mapping[str, Any]
) -> list[Lora]:
    """``[(name, path), ...]`` loaded and mapped onto ``bank``'s weights (one target index for all)."""
    targets = targets_for_bank(bank, unet_config=unet_config)
    return [load_lora(path, targets=targets, layout=bank.layout, name=name) for name, path in specs]
