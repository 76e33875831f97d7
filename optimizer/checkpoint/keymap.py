"""Key mapping between diffusers component state dicts and LDM (A1111 single-file) names.

Architectures: ``"sd1"``, ``"sd2"``, ``"sdxl"``. Components and their LDM prefixes:

=================  ==========================================  ==========================
component          LDM prefix                                  format
=================  ==========================================  ==========================
``unet``           ``model.diffusion_model.``                  LDM ``openaimodel`` UNet
``vae``            ``first_stage_model.``                      LDM ``AutoencoderKL``
``text_encoder``   ``cond_stage_model.transformer.`` (sd1)     HF ``CLIPTextModel``
                   ``cond_stage_model.model.`` (sd2)           OpenCLIP text tower
                   ``conditioner.embedders.0.transformer.``    HF ``CLIPTextModel`` (sdxl)
``text_encoder_2`` ``conditioner.embedders.1.model.`` (sdxl)   OpenCLIP text tower
=================  ==========================================  ==========================

:func:`ldm_to_diffusers` uses diffusers' own converters (``diffusers.loaders.single_file_utils``),
after checking the LDM keys and shapes against a model built (without memory, on the ``meta``
device) from the component configs. :func:`diffusers_to_ldm` is the inverse, which diffusers only
ships as scripts; it is driven by the UNet / VAE configs (number of levels, ``layers_per_block``,
which levels have attention), so it works for any SD1/SD2/SDXL-shaped model, tiny test models
included.

Tensors are passed through untouched wherever the mapping is a rename (the same tensor objects).
The only new tensors are: VAE mid-block attention weights (a ``view`` between diffusers ``Linear``
``[out, in]`` and LDM 1x1 conv ``[out, in, 1, 1]``), the OpenCLIP ``in_proj_weight``/``bias``
(concatenation of q/k/v) and ``text_projection`` (transpose, made contiguous).

Every problem raises :class:`~optimizer.checkpoint.types.CheckpointError` naming the offending key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from optimizer.checkpoint.types import CheckpointError

__all__ = [
    "ARCHITECTURES",
    "COMPONENT_PREFIXES",
    "component_of",
    "diffusers_to_ldm",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_TEXT_FORMAT = {"ldm_clip": "hf", "openclip": "openclip"}


def _component_prefixes() -> dict[str, dict[str, tuple[str, str | None]]]:
    """``architecture -> {component: (LDM prefix, text format)}`` from the architecture records
    whose modules use the LDM schemes; text format ``"hf"`` (HF CLIP) or ``"openclip"``, ``None``
    for the UNet and VAE."""
    from optimizer.architectures.layout import available_layouts, load_layout

    out: dict[str, dict[str, tuple[str, str | None]]] = {}
    for name in available_layouts():
        layout = load_layout(name)
        if layout.ldm:
            out[name] = {m.name: (m.prefix, _TEXT_FORMAT.get(m.scheme)) for m in layout.spec.modules}
    return out


#: ``architecture -> {component: (LDM prefix, text format)}`` (read from the records)
COMPONENT_PREFIXES: dict[str, dict[str, tuple[str, str | None]]] = _component_prefixes()
ARCHITECTURES = tuple(COMPONENT_PREFIXES)

#: Top-level LDM prefixes that hold model weights. Keys outside them (noise-schedule buffers such as
#: ``alphas_cumprod``, ``model_ema.*``, ``denoiser.*``) are not model weights and are ignored.
_WEIGHT_PREFIXES = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.")

_CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",
}


def _check_architecture(architecture: str) -> dict[str, tuple[str, str | None]]:
    try:
        return COMPONENT_PREFIXES[architecture]
    except KeyError:
        raise CheckpointError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}") from None


def component_of(key: str, *, architecture: str) -> str | None:
    """The component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) owning LDM ``key``.

    Returns ``None`` for keys outside the model-weight prefixes (schedule buffers, EMA copies).
    Raises :class:`CheckpointError` for a model-weight key that belongs to no component of
    ``architecture`` (for example an SDXL ``conditioner.*`` key in an SD1 state dict).
    """
    prefixes = _check_architecture(architecture)
    for component, (prefix, _) in prefixes.items():
        if key.startswith(prefix):
            return component
    if key.startswith(_WEIGHT_PREFIXES):
        raise CheckpointError(f"key {key!r} belongs to no component of a {architecture} checkpoint")
    return None


# --------------------------------------------------------------------------------------------
# diffusers -> LDM
# --------------------------------------------------------------------------------------------

_PARAM = r"(weight|bias)"
_RESNET_UNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_VAE = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# Transformer2DModel parameters have the same names in diffusers and LDM (SpatialTransformer).
_TRANSFORMER_SUFFIX = re.compile(
    r"((norm|proj_in|proj_out)|transformer_blocks\.\d+\.(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.0\.proj|ff\.net\.2))\." + _PARAM + r"$"
)
_U_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_U_DOWNSAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\." + _PARAM + "$")
_U_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_U_UPSAMPLE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\." + _PARAM + "$")
_U_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_RESNET_SUFFIX = re.compile(r"(norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)\." + _PARAM + "$")

_V_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\." + _PARAM + "$")
_V_DOWNSAMPLE = re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\." + _PARAM + "$")
_V_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\." + _PARAM + "$")
_V_UPSAMPLE = re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\." + _PARAM + "$")
_V_MID_RES = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\." + _PARAM + "$")
# current (group_norm, to_q, ...) and pre-0.14 diffusers names (query, key, value, proj_attn)
_V_MID_ATTN = re.compile(
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn)\."
    + _PARAM + "$"
)
_V_ATTN_NAME = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}

_HF_CLIP_KEY = re.compile(
    r"text_model\.(embeddings\.(token_embedding|position_embedding)\.weight|embeddings\.position_ids"
    r"|final_layer_norm\." + _PARAM
    + r"|encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\."
    + _PARAM + ")$"
)
_OC_LAYER = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\."
    + _PARAM + "$"
)
_OC_LAYER_NAME = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OC_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def _cfg_int(config: Mapping[str, Any], name: str, component: str) -> int:
    value = config.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{component} config: {name} must be an integer, got {value!r} (not an SD-shaped model)")
    return value


def unet_mapper(config: Mapping[str, Any]):
    """Build ``diffusers key -> LDM key (without prefix)`` for a UNet2DConditionModel config."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    down_types = list(config.get("down_block_types") or [])
    up_types = list(config.get("up_block_types") or [])
    if not down_types or len(down_types) != len(up_types):
        raise CheckpointError(f"unet config: down_block_types {down_types} and up_block_types {up_types} do not pair up")
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type not in (None, "UNetMidBlock2DCrossAttn"):
        raise CheckpointError(f"unet config: mid_block_type {mid_type!r} has no LDM equivalent")
    n = len(down_types)
    per = _cfg_int(config, "layers_per_block", "unet")
    top = {k: v for k, v in DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"].items()}
    if config.get("addition_embed_type") == "text_time":
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    elif config.get("class_embed_type") in ("timestep", "projection"):
        top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"])

    def resnet(suffix: str, key: str) -> str:
        m = _RESNET_SUFFIX.match(suffix)
        if not m:
            raise CheckpointError(f"unet: unknown resnet parameter in diffusers key {key!r}")
        return f"{_RESNET_UNET[m.group(1)]}.{m.group(2)}"

    def attention(suffix: str, key: str, has_attention: bool) -> str:
        if not has_attention:
            raise CheckpointError(f"unet: diffusers key {key!r} is an attention of a block without attention in the config")
        if not _TRANSFORMER_SUFFIX.match(suffix):
            raise CheckpointError(f"unet: unknown transformer parameter in diffusers key {key!r}")
        return suffix

    def check(value: int, limit: int, what: str, key: str) -> int:
        if value >= limit:
            raise CheckpointError(f"unet: {what} {value} in diffusers key {key!r} is out of range for the config (< {limit})")
        return value

    def mapper(key: str) -> str:
        if key in top:
            return top[key]
        if m := _U_DOWN.match(key):
            b = check(int(m.group(1)), n, "down block", key)
            layer = check(int(m.group(3)), per, "layer", key)
            idx = 1 + b * (per + 1) + layer
            if m.group(2) == "resnets":
                return f"input_blocks.{idx}.0.{resnet(m.group(4), key)}"
            return f"input_blocks.{idx}.1.{attention(m.group(4), key, 'Attn' in down_types[b])}"
        if m := _U_DOWNSAMPLE.match(key):
            b = check(int(m.group(1)), n - 1, "down block with a downsampler", key)
            return f"input_blocks.{1 + b * (per + 1) + per}.0.op.{m.group(2)}"
        if m := _U_UP.match(key):
            b = check(int(m.group(1)), n, "up block", key)
            layer = check(int(m.group(3)), per + 1, "layer", key)
            idx = b * (per + 1) + layer
            if m.group(2) == "resnets":
                return f"output_blocks.{idx}.0.{resnet(m.group(4), key)}"
            return f"output_blocks.{idx}.1.{attention(m.group(4), key, 'Attn' in up_types[b])}"
        if m := _U_UPSAMPLE.match(key):
            b = check(int(m.group(1)), n - 1, "up block with an upsampler", key)
            position = 2 if "Attn" in up_types[b] else 1
            return f"output_blocks.{b * (per + 1) + per}.{position}.conv.{m.group(2)}"
        if m := _U_MID.match(key):
            i = int(m.group(2))
            if m.group(1) == "resnets":
                check(i, 2, "mid-block resnet", key)
                return f"middle_block.{2 * i}.{resnet(m.group(3), key)}"
            check(i, 1, "mid-block attention", key)
            return f"middle_block.1.{attention(m.group(3), key, True)}"
        raise CheckpointError(f"unet: unknown diffusers key {key!r}")

    return mapper


def _vae_level(level: int, limit: int, key: str) -> int:
    if level >= limit:
        raise CheckpointError(f"vae: block {level} in diffusers key {key!r} is out of range for the config (< {limit})")
    return level


def _vae_convert(key: str, tensor: torch.Tensor, n_up: int) -> tuple[str, torch.Tensor]:
    """``(LDM key without prefix, tensor)`` for VAE diffusers ``key``; ``n_up`` is the number of levels."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key], tensor
    if m := _V_DOWN.match(key):
        _vae_level(int(m.group(1)), n_up, key)
        return f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_RESNET_VAE[m.group(3)]}.{m.group(4)}", tensor
    if m := _V_DOWNSAMPLE.match(key):
        _vae_level(int(m.group(1)), n_up - 1, key)
        return f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}", tensor
    if m := _V_UP.match(key):
        i = _vae_level(int(m.group(1)), n_up, key)
        return f"decoder.up.{n_up - 1 - i}.block.{m.group(2)}.{_RESNET_VAE[m.group(3)]}.{m.group(4)}", tensor
    if m := _V_UPSAMPLE.match(key):
        i = _vae_level(int(m.group(1)), n_up - 1, key)
        return f"decoder.up.{n_up - 1 - i}.upsample.conv.{m.group(2)}", tensor
    if m := _V_MID_RES.match(key):
        i = int(m.group(2))
        if i > 1:
            raise CheckpointError(f"vae: mid-block resnet {i} in diffusers key {key!r} does not exist in LDM (0 or 1)")
        return f"{m.group(1)}.mid.block_{i + 1}.{_RESNET_VAE[m.group(3)]}.{m.group(4)}", tensor
    if m := _V_MID_ATTN.match(key):
        name = _V_ATTN_NAME[m.group(2)]
        if name != "norm" and m.group(3) == "weight":
            if tensor.ndim == 2:
                tensor = tensor.view(*tensor.shape, 1, 1) if tensor.is_contiguous() else tensor.reshape(*tensor.shape, 1, 1)
            elif not (tensor.ndim == 4 and tensor.shape[2:] == (1, 1)):
                raise CheckpointError(f"vae: attention weight {key!r} has shape {tuple(tensor.shape)}, expected [out, in]")
        return f"{m.group(1)}.mid.attn_1.{name}.{m.group(3)}", tensor
    raise CheckpointError(f"vae: unknown diffusers key {key!r}")


def _text_model_key(key: str, *, component: str) -> str:
    """Normalize an HF CLIP key to the classic ``text_model.*`` form (transformers >= 5.6 drops it)."""
    if key.startswith("text_model.") or key == "text_projection.weight":
        return key
    if key.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
        return "text_model." + key
    raise CheckpointError(f"{component}: unknown diffusers key {key!r}")


def _hf_clip_to_ldm(sd: Mapping[str, torch.Tensor], *, prefix: str, component: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in sd.items():
        norm = _text_model_key(key, component=component)
        if not _HF_CLIP_KEY.match(norm):
            raise CheckpointError(f"{component}: unknown diffusers key {key!r} (no LDM equivalent in an HF CLIP text encoder)")
        ldm = prefix + norm
        if ldm in out:
            raise CheckpointError(f"{component}: keys {origin[ldm]!r} and {key!r} are the same parameter")
        out[ldm] = tensor
        origin[ldm] = key
    return out


def _openclip_to_ldm(sd: Mapping[str, torch.Tensor], *, prefix: str, component: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    qkv: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}

    def put(ldm: str, tensor: torch.Tensor, key: str) -> None:
        if ldm in out:
            raise CheckpointError(f"{component}: keys {origin[ldm]!r} and {key!r} are the same parameter")
        out[ldm] = tensor
        origin[ldm] = key

    for key, tensor in sd.items():
        norm = _text_model_key(key, component=component)
        if norm in _OC_TOP:
            put(prefix + _OC_TOP[norm], tensor, key)
        elif norm == "text_projection.weight":
            # HF Linear weight [proj, hidden]; OpenCLIP parameter [hidden, proj] used as x @ P
            put(prefix + "text_projection", tensor.T.contiguous(), key)
        elif norm == "text_model.embeddings.position_ids":
            continue  # a constant buffer; OpenCLIP has none
        elif m := _OC_LAYER.match(norm):
            layer, name, proj, param = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            if proj in ("q_proj", "k_proj", "v_proj"):
                group = qkv.setdefault((layer, param), {})
                if proj in group:
                    raise CheckpointError(f"{component}: keys {group[proj][0]!r} and {key!r} are the same parameter")
                group[proj] = (key, tensor)
            else:
                put(f"{prefix}transformer.resblocks.{layer}.{_OC_LAYER_NAME[name]}.{param}", tensor, key)
        else:
            raise CheckpointError(f"{component}: unknown diffusers key {key!r} (no LDM equivalent in an OpenCLIP text tower)")
    for (layer, param), group in sorted(qkv.items()):
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in group]
        if missing:
            present_proj, (present, _) = next(iter(group.items()))
            names = ", ".join(repr(present.replace(present_proj, p)) for p in missing)
            raise CheckpointError(
                f"{component}: missing {names} next to {present!r}; OpenCLIP stores q, k and v as one in_proj tensor"
            )
        tensors = [group[p][1] for p in ("q_proj", "k_proj", "v_proj")]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1:
            raise CheckpointError(f"{component}: q/k/v {param} shapes of layer {layer} differ: {[tuple(t.shape) for t in tensors]}")
        name = "in_proj_weight" if param == "weight" else "in_proj_bias"
        put(f"{prefix}transformer.resblocks.{layer}.attn.{name}", torch.cat(tensors, dim=0), group["q_proj"][0])
    return out


def diffusers_to_ldm(
    *,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    architecture: str,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Convert diffusers component state dicts to one LDM-named state dict.

    ``components`` maps component names (``unet``, ``vae``, ``text_encoder`` and, for SDXL,
    ``text_encoder_2``) to their diffusers / transformers state dicts; any subset may be given.
    ``unet_config`` (the UNet2DConditionModel config) is required when ``unet`` is given and
    ``vae_config`` (the AutoencoderKL config) when ``vae`` is given: they fix the number of levels,
    ``layers_per_block`` and which levels have attention. HF CLIP keys are accepted both with and
    without the ``text_model.`` prefix (transformers >= 5.6 drops it for ``CLIPTextModel``), and
    the VAE accepts pre-0.14 diffusers attention names (``query``/``key``/``value``/``proj_attn``).

    Renamed tensors are the very objects given (no copies). New tensors: VAE attention weights
    (views reshaped to 1x1 convs), OpenCLIP ``in_proj_*`` (q/k/v concatenated) and
    ``text_projection`` (transposed, contiguous). ``position_ids`` of an OpenCLIP tower is dropped
    (a constant buffer OpenCLIP does not store); for HF CLIP towers it is kept as a rename.

    Raises :class:`CheckpointError` naming the key for an unknown key, a key out of range for the
    config, two keys naming the same parameter, or incomplete q/k/v; and for an unknown component
    or architecture, or a missing config.
    """
    prefixes = _check_architecture(architecture)
    result: dict[str, torch.Tensor] = {}
    for component, sd in components.items():
        if component not in prefixes:
            raise CheckpointError(
                f"{architecture} has no component {component!r}; expected one of {', '.join(prefixes)}"
            )
        prefix, text_format = prefixes[component]
        if component == "unet":
            if unet_config is None:
                raise CheckpointError("diffusers_to_ldm: unet_config is required to convert the unet")
            mapper = unet_mapper(unet_config)
            part: dict[str, torch.Tensor] = {}
            origin: dict[str, str] = {}
            for key, tensor in sd.items():
                ldm = prefix + mapper(key)
                if ldm in part:
                    raise CheckpointError(f"unet: keys {origin[ldm]!r} and {key!r} both map to {ldm!r}")
                part[ldm] = tensor
                origin[ldm] = key
        elif component == "vae":
            if vae_config is None:
                raise CheckpointError("diffusers_to_ldm: vae_config is required to convert the vae")
            n_up = len(vae_config.get("up_block_types") or vae_config.get("block_out_channels") or [])
            if n_up == 0:
                raise CheckpointError("vae config: no up_block_types")
            part, origin = {}, {}
            for key, tensor in sd.items():
                name, value = _vae_convert(key, tensor, n_up)
                ldm = prefix + name
                if ldm in part:
                    raise CheckpointError(f"vae: keys {origin[ldm]!r} and {key!r} both map to {ldm!r}")
                part[ldm] = value
                origin[ldm] = key
        elif text_format == "hf":
            part = _hf_clip_to_ldm(sd, prefix=prefix, component=component)
        else:
            part = _openclip_to_ldm(sd, prefix=prefix, component=component)
        result.update(part)
    return result
