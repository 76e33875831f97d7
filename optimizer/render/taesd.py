"""TAESD: a tiny distilled SD VAE (madebyollin/taesd), for fast preview rendering.

TAESD decodes SD latents to images with ~1.2 M parameters instead of the ~49.5 M of the full SD
VAE decoder, at a small cost in fidelity (fine detail, text), which is fine for ranking merge
candidates by CLIP / aesthetic scores but not for final images.

Weights are the original ``taesd.py`` files (``taesd_encoder.safetensors`` /
``taesd_decoder.safetensors`` for SD1.x/2.x, ``taesdxl_*`` for SDXL), whose keys follow
``taesd.py``'s ``nn.Sequential`` numbering (``1.weight``, ``10.conv.0.weight``, ...). They are
loaded into diffusers' :class:`~diffusers.AutoencoderTiny` with this key mapping (the same as
diffusers' ``scripts/convert_tiny_autoencoder_to_diffusers.py``):

* encoder ``N.rest`` -> ``encoder.layers.N.rest``: ``taesd.py``'s ``Encoder`` and diffusers'
  ``EncoderTiny.layers`` have the same layer order (conv, block, [strided conv, 3 blocks] x 3,
  conv);
* decoder ``N.rest`` -> ``decoder.layers.{N-1}.rest``: ``taesd.py``'s ``Decoder`` starts with a
  parameter-free ``Clamp`` module (index 0, ``tanh(x / 3) * 3``), which diffusers' ``DecoderTiny``
  applies in ``forward`` instead of as a layer, so every later layer index is one lower. A decoder
  file key ``0.*`` therefore cannot exist and is reported as unexpected.

Loading is strict: every tensor of a file must map onto a parameter of the model, every
parameter of the loaded part(s) must come from the file, and shapes must agree; otherwise
:class:`TAESDError` names the file and the offending keys.

Conventions (diffusers' ``AutoencoderTiny``): ``encode`` takes images in [-1, 1] and returns raw
SD latents (already in the UNet's latent space: ``scaling_factor`` is 1.0, so the pipelines'
``latents / vae.config.scaling_factor`` is a no-op); ``decode`` returns images in about [-1, 1]
(not clamped). The latent is 8x smaller than the image per side, as for the full VAE.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from optimizer.errors import EvomergeError
from optimizer.render.pipelines import replace_components

if TYPE_CHECKING:
    from diffusers import AutoencoderTiny, DiffusionPipeline

__all__ = [
    "TAESDError",
    "TAESDFileNotFoundError",
    "TAESD_CONFIGS",
    "TAESD_FILE_STEMS",
    "Variant",
    "diffusers_key_to_taesd",
    "load_taesd",
    "map_taesd_state_dict",
    "swap_decoder",
    "taesd_files",
    "taesd_key_to_diffusers",
]

Variant = Literal["sd", "sdxl"]
Part = Literal["encoder", "decoder"]

#: variant -> file name stem in the taesd releases (``<stem>_encoder.safetensors``, ``<stem>_decoder.safetensors``)
TAESD_FILE_STEMS: dict[str, str] = {"sd": "taesd", "sdxl": "taesdxl"}

# The config of the official diffusers conversions madebyollin/taesd and madebyollin/taesdxl
# (identical for both: same architecture, 4 latent channels, latents scaled by 1/(2*3) + 0.5 into
# [0, 1] for 8-bit storage). Spelled out rather than relying on AutoencoderTiny's defaults.
_TAESD_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (64, 64, 64, 64),
    "decoder_block_out_channels": (64, 64, 64, 64),
    "act_fn": "relu",
    "upsample_fn": "nearest",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": (1, 3, 3, 3),
    "num_decoder_blocks": (3, 3, 3, 1),
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
}

#: variant -> ``AutoencoderTiny(**config)`` keyword arguments
TAESD_CONFIGS: dict[str, dict[str, Any]] = {"sd": dict(_TAESD_CONFIG), "sdxl": dict(_TAESD_CONFIG)}

_FILE_KEY = re.compile(r"^(\d+)\.(.+)$")
_DIFFUSERS_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)$")
_SHOW = 12  # keys listed per category in an error message


class TAESDError(EvomergeError, ValueError):
    """A TAESD weight file is unreadable or does not match the AutoencoderTiny architecture."""


class TAESDFileNotFoundError(TAESDError, FileNotFoundError):
    """A TAESD weight file does not exist (both a :class:`TAESDError` and a :class:`FileNotFoundError`)."""


# --------------------------------------------------------------------------------------------
# key mapping


def taesd_key_to_diffusers(key: str, *, part: Part) -> str | None:
    """The ``AutoencoderTiny`` state-dict key of ``taesd.py`` key ``key`` of an encoder/decoder file.

    ``None`` when the key cannot belong to such a file (not ``<int>.<name>``, or decoder index 0,
    the parameter-free ``Clamp``).
    """
    match = _FILE_KEY.match(key)
    if match is None:
        return None
    index, rest = int(match.group(1)), match.group(2)
    if part == "encoder":
        return f"encoder.layers.{index}.{rest}"
    if part == "decoder":
        return f"decoder.layers.{index - 1}.{rest}" if index >= 1 else None
    raise ValueError(f"part must be 'encoder' or 'decoder', not {part!r}")


def diffusers_key_to_taesd(key: str) -> tuple[Part, str]:
    """Inverse of :func:`taesd_key_to_diffusers`: ``("decoder", "10.conv.0.weight")`` for ``decoder.layers.9.conv.0.weight``."""
    match = _DIFFUSERS_KEY.match(key)
    if match is None:
        raise ValueError(f"{key!r} is not an AutoencoderTiny encoder/decoder layer key")
    part, index, rest = match.group(1), int(match.group(2)), match.group(3)
    return part, f"{index + 1 if part == 'decoder' else index}.{rest}"  # type: ignore[return-value]


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def map_taesd_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    part: Part,
    reference: Mapping[str, torch.Tensor],
    source: str | os.PathLike[str] = "<state dict>",
) -> dict[str, torch.Tensor]:
    """Rename a ``taesd.py`` encoder or decoder state dict to ``AutoencoderTiny`` keys, strictly.

    ``reference`` is the target model's state dict (only its ``<part>.`` keys are used, for names
    and shapes). Returns ``{diffusers key: tensor}`` covering exactly those keys. Raises
    :class:`TAESDError` naming ``source`` and listing every unexpected key (file names), missing
    key (file names, with the diffusers name) and shape mismatch.
    """
    prefix = f"{part}."
    expected = {k: tuple(v.shape) for k, v in reference.items() if k.startswith(prefix)}
    if not expected:
        raise ValueError(f"reference has no {prefix!r} keys")
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    mismatched_targets: set[str] = set()
    for key, tensor in state_dict.items():
        target = taesd_key_to_diffusers(key, part=part)
        if target is None or target not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != expected[target]:
            mismatched.append(f"{key} {tuple(tensor.shape)} (expected {expected[target]} for {target})")
            mismatched_targets.add(target)
            continue
        mapped[target] = tensor
    missing = sorted(k for k in expected if k not in mapped and k not in mismatched_targets)
    if unexpected or missing or mismatched:
        lines = [f"{source}: not a TAESD {part} state dict in taesd.py key format ({len(state_dict)} tensors):"]
        if missing:
            lines.append(
                f"  missing {len(missing)} key(s): "
                + _listing([f"{diffusers_key_to_taesd(k)[1]} (-> {k})" for k in missing])
            )
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} key(s): {_listing(sorted(unexpected))}")
        if mismatched:
            lines.append(f"  wrong shape for {len(mismatched)} key(s): {_listing(mismatched)}")
        if any(k.startswith(("encoder.", "decoder.")) for k in state_dict):
            lines.append("  (keys look like a diffusers AutoencoderTiny checkpoint: load it with AutoencoderTiny.from_pretrained)")
        elif part == "decoder" and "0.weight" in state_dict:
            lines.append("  (a '0.weight' key suggests this is an encoder file: decoder index 0 is the parameter-free Clamp)")
        raise TAESDError("\n".join(lines))
    return mapped


# --------------------------------------------------------------------------------------------
# files and loading


def taesd_files(directory: str | os.PathLike[str], variant: Variant = "sd") -> tuple[Path, Path]:
    """``(encoder_path, decoder_path)`` of the ``variant``'s TAESD files in ``directory`` (not checked for existence)."""
    if variant not in TAESD_FILE_STEMS:
        raise ValueError(f"variant must be one of {sorted(TAESD_FILE_STEMS)}, not {variant!r}")
    stem = TAESD_FILE_STEMS[variant]
    directory = Path(directory)
    return directory / f"{stem}_encoder.safetensors", directory / f"{stem}_decoder.safetensors"


def _read(path: Path, part: Part) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise TAESDFileNotFoundError(f"TAESD {part} file not found: {path}")
    from optimizer.checkpoint.safe_read import check_weight_file

    check_weight_file(path, error=TAESDError)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TAESDError(
            f"{path}: not a readable safetensors file ({path.stat().st_size} bytes; truncated or corrupt?): {exc}"
        ) from exc


class _EncoderNotLoaded(nn.Module):
    """Stands in for ``AutoencoderTiny.encoder`` when only decoder weights were loaded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        raise TAESDError(
            "this AutoencoderTiny was loaded decoder-only (load_taesd without an encoder file): it cannot encode"
        )

    def extra_repr(self) -> str:
        return "not loaded: decoder-only TAESD"


def load_taesd(
    *,
    directory: str | os.PathLike[str] | None = None,
    encoder: str | os.PathLike[str] | None = None,
    decoder: str | os.PathLike[str] | None = None,
    variant: Variant = "sd",
    load_encoder: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AutoencoderTiny:
    """An ``AutoencoderTiny`` (eval mode, ``dtype``, on ``device``) with the TAESD weights of ``variant``.

    File selection:

    * ``decoder``: the explicit path, else ``<directory>/<stem>_decoder.safetensors``
      (:func:`taesd_files`). Required: a :class:`ValueError` when neither is given.
    * ``encoder``: the explicit path, else (when ``directory`` is given and ``load_encoder``)
      ``<directory>/<stem>_encoder.safetensors``. With no encoder file (``load_encoder=False``, or
      only ``decoder=`` given) the model is **decoder-only**: its ``encoder`` is a parameter-free
      stand-in that raises :class:`TAESDError` when called, so ``decode`` and text-to-image
      pipelines work and ``encode`` (img2img) fails loudly instead of returning garbage. Its state
      dict then holds only ``decoder.*`` keys.

    ``variant`` picks the file names (``taesd_*`` for SD1.x/2.x, ``taesdxl_*`` for SDXL) and the
    config (:data:`TAESD_CONFIGS`; both variants share one architecture, so an SD file passed as
    SDXL loads and only decodes badly: the variant cannot be checked from the weights).

    Raises :class:`TAESDFileNotFoundError` (a :class:`TAESDError` and a :class:`FileNotFoundError`)
    listing every missing file before reading any, and :class:`TAESDError` naming the file for an
    unreadable one or one whose keys/shapes do not map exactly onto the model (see
    :func:`map_taesd_state_dict`).
    """
    from diffusers import AutoencoderTiny

    if variant not in TAESD_CONFIGS:
        raise ValueError(f"variant must be one of {sorted(TAESD_CONFIGS)}, not {variant!r}")
    if encoder is not None and not load_encoder:
        raise ValueError("an encoder file was given with load_encoder=False")
    default_encoder, default_decoder = taesd_files(directory, variant) if directory is not None else (None, None)
    decoder_path = Path(decoder) if decoder is not None else default_decoder
    if decoder_path is None:
        raise ValueError("load_taesd needs a decoder file: pass directory= or decoder=")
    encoder_path = Path(encoder) if encoder is not None else (default_encoder if load_encoder else None)

    wanted = [(part, path) for part, path in (("encoder", encoder_path), ("decoder", decoder_path)) if path is not None]
    absent = [f"{part} {path}" for part, path in wanted if not path.is_file()]
    if absent:
        raise TAESDFileNotFoundError(f"TAESD {variant} file(s) not found: {'; '.join(absent)}")

    model = AutoencoderTiny(**TAESD_CONFIGS[variant])
    if encoder_path is None:
        model.encoder = _EncoderNotLoaded()
    reference = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    if encoder_path is not None:
        state.update(map_taesd_state_dict(_read(encoder_path, "encoder"), part="encoder", reference=reference, source=encoder_path))
    state.update(map_taesd_state_dict(_read(decoder_path, "decoder"), part="decoder", reference=reference, source=decoder_path))
    # every key is covered by construction (map_taesd_state_dict is exact per part), so strict=True cannot fail
    model.load_state_dict(state, strict=True)
    # nn.Module.to: ModelMixin.to warns about "modules to keep in float32" (AutoencoderTiny has none) on any dtype cast
    nn.Module.to(model, device=device, dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------
# pipelines


def swap_decoder(pipe: DiffusionPipeline, tiny: AutoencoderTiny) -> DiffusionPipeline:
    """A new pipeline of ``type(pipe)`` sharing every component of ``pipe`` except ``vae``, which is ``tiny``.

    The new pipeline is built with the class's own ``__init__`` from ``pipe.components`` plus the
    optional config arguments ``pipe`` was built with (``requires_safety_checker``,
    ``force_zeros_for_empty_prompt``, ..., and SDXL's ``add_watermarker``) and copies ``pipe``'s progress-bar settings. ``pipe``
    itself is not modified: its ``vae``, components, config and dtypes stay as they were.

    Built by :func:`optimizer.render.pipelines.replace_components` (not ``from_pipe``, which casts
    the shared modules to float32).

    ``tiny`` is used as given (not moved or cast): load it with the dtype and device of the UNet
    (``load_taesd(dtype=..., device=...)``), as the SD pipelines pass the UNet's latents to
    ``vae.decode`` unconverted. Components are shared objects, including the (stateful) scheduler:
    run the two pipelines one after the other, not concurrently.
    """
    from diffusers import AutoencoderTiny

    if not isinstance(tiny, AutoencoderTiny):
        raise TypeError(f"tiny must be a diffusers AutoencoderTiny, not {type(tiny).__name__}")
    if "vae" not in pipe.components:
        raise ValueError(f"{type(pipe).__name__} has no 'vae' component to swap")
    return replace_components(pipe, vae=tiny)


#: the TAESD variant that decodes each architecture's latents
TAESD_VARIANT_OF: dict[str, Variant] = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}


def with_taesd_decoder(pipe: DiffusionPipeline, *, directory: str | os.PathLike[str], architecture: str) -> DiffusionPipeline:
    """``pipe`` with its VAE decoder replaced by TAESD's (decoder-only, the UNet's dtype and device;
    see :func:`swap_decoder`): the study file's ``render.decoder: taesd``. Refused with one line for
    an architecture TAESD has no decoder for, or a VAE whose latents are not 4-channel."""
    variant = TAESD_VARIANT_OF.get(architecture)
    if variant is None:
        raise TAESDError(f"render.decoder: taesd has decoders for {', '.join(TAESD_VARIANT_OF)}, not {architecture}; use decoder: vae")
    channels = getattr(getattr(pipe, "vae", None), "config", {}).get("latent_channels", 4)
    if channels != 4:
        raise TAESDError(f"render.decoder: taesd decodes 4-channel latents; this model's VAE makes {channels}; use decoder: vae")
    unet = pipe.unet
    parameter = next(unet.parameters())
    tiny = load_taesd(directory=directory, variant=variant, load_encoder=False, dtype=parameter.dtype, device=parameter.device)
    return swap_decoder(pipe, tiny)

