"""Tiny, real-topology SD3 / SD3.5 and Flux.1 models for tests and demos.

Built with diffusers' and transformers' own classes, seeded: every block of the real model is
there (24 or 38 MMDiT joint blocks; 19 double and 38 single Flux blocks), only the widths are
tiny, so the key set of a tiny model is the key set of the real one (checked against sd-mecha's
model configs in the tests).

* ``sd3``: SD3 Medium topology (no q/k norm); ``sd3.5``: SD3.5 Medium (RMS q/k norm, MMDiT-X
  second attention in blocks 0-12); ``sd35_large``: 38 blocks with q/k norm. CLIP-L and CLIP-G
  as ``CLIPTextModelWithProjection`` and a T5 encoder.
* ``flux-dev`` / ``flux-schnell``: guidance embedding or not; CLIP-L (``CLIPTextModel``) and T5.

:func:`write_tiny_dit_single_file` writes the canonical (ComfyUI-style) single file, or a bare
transformer file with Black Forest Labs' names (``bare=True``); :func:`tiny_dit_config_dir` a
matching offline config folder (with a small T5 tokenizer); :func:`write_tiny_dit_diffusers` a
diffusers folder saved by the pipeline's own ``save_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_DIT_VARIANTS",
    "t5_tokenizer_json",
    "tiny_dit_canonical_state_dict",
    "tiny_dit_components",
    "tiny_dit_config_dir",
    "write_tiny_dit_diffusers",
    "write_tiny_dit_single_file",
]

#: variant -> (architecture record, shipped config folder)
TINY_DIT_VARIANTS: dict[str, tuple[str, str]] = {
    "sd3": ("sd3", "sd35_medium"),
    "sd3.5": ("sd3", "sd35_medium"),
    "sd35_large": ("sd35_large", "sd35_large"),
    "flux-dev": ("flux", "flux"),
    "flux-schnell": ("flux", "flux_schnell"),
}

_T5_VOCAB = 64
_CLIP_VOCAB = 49408


def _clip(hidden: int, *, act: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=_CLIP_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=77, hidden_act=act, projection_dim=hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=_T5_VOCAB, d_model=d_model, d_ff=2 * d_model, d_kv=8, num_heads=2, num_layers=2,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True, tie_word_embeddings=False,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0, eos_token_id=1,
    ))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5, shift_factor=0.06,
    )


def tiny_dit_components(variant: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The pipeline modules of a tiny ``variant`` model (see :data:`TINY_DIT_VARIANTS`), eval mode, float32."""
    if variant not in TINY_DIT_VARIANTS:
        raise ValueError(f"unknown tiny DiT variant {variant!r}; known: {', '.join(TINY_DIT_VARIANTS)}")
    torch.manual_seed(seed)
    if variant.startswith("flux"):
        from diffusers import FluxTransformer2DModel

        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=variant == "flux-dev", axes_dims_rope=(2, 2, 4),
        )
        modules = {"transformer": transformer, "vae": _vae(), "text_encoder": _clip(32, act="quick_gelu", projection=False),
                   "text_encoder_2": _t5(32)}
    else:
        from diffusers import SD3Transformer2DModel

        large = variant == "sd35_large"
        transformer = SD3Transformer2DModel(
            sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=38 if large else 24, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=48,
            pos_embed_max_size=8, qk_norm=None if variant == "sd3" else "rms_norm",
            dual_attention_layers=tuple(range(13)) if variant == "sd3.5" else (),
        )
        modules = {"transformer": transformer, "vae": _vae(), "text_encoder": _clip(16, act="quick_gelu", projection=True),
                   "text_encoder_2": _clip(32, act="gelu", projection=True), "text_encoder_3": _t5(64)}
    return {name: module.eval() for name, module in modules.items()}


def tiny_dit_canonical_state_dict(components: dict[str, torch.nn.Module], variant: str) -> dict[str, torch.Tensor]:
    """The canonical (ComfyUI-style) state dict of ``components``."""
    from optimizer.architectures.layout import load_layout
    from optimizer.checkpoint.convert import from_diffusers

    layout = load_layout(TINY_DIT_VARIANTS[variant][0])
    configs = {name: dict(m.config) for name, m in components.items() if name == "vae"}
    return from_diffusers(modules={n: m.state_dict() for n, m in components.items()}, layout=layout, configs=configs)


def write_tiny_dit_single_file(
    path: str | Path, components: dict[str, torch.nn.Module], variant: str, *, bare: bool = False, with_text_encoders: bool = True
) -> Path:
    """Write the canonical single file (``bare``: transformer only, BFL names without a prefix)."""
    from safetensors.torch import save_file

    from optimizer.architectures.layout import load_layout

    layout = load_layout(TINY_DIT_VARIANTS[variant][0])
    state = tiny_dit_canonical_state_dict(components, variant)
    prefix = layout.spec.bare_prefix or ""
    if bare:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif not with_text_encoders:
        state = {k: v for k, v in state.items() if not k.startswith("text_encoders.")}
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def t5_tokenizer_json() -> str:
    """A small T5-style (Unigram, ``</s>``-terminated) ``tokenizer.json`` over letters and digits, ids < 64."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok.to_str()


_T5_TOKENIZER_CONFIG = (
    '{"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", '
    '"extra_ids": 0, "model_max_length": 512}'
)


def tiny_dit_config_dir(components: dict[str, torch.nn.Module], variant: str) -> Path:
    """An offline config folder whose module configs match ``components`` (plus a small T5 tokenizer)."""
    import diffusers

    from optimizer.checkpoint.config_dir import diffusers_config_dir

    _, config = TINY_DIT_VARIANTS[variant]
    overrides: dict[str, Any] = {
        "transformer_config": {**components["transformer"].config, "_diffusers_version": diffusers.__version__},
        "vae_config": dict(components["vae"].config),
    }
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if name in components:
            overrides[f"{name}_config"] = components[name].config.to_diff_dict()
    t5 = "tokenizer_2" if variant.startswith("flux") else "tokenizer_3"
    extra = {f"{t5}/tokenizer.json": t5_tokenizer_json(), f"{t5}/tokenizer_config.json": _T5_TOKENIZER_CONFIG}
    return diffusers_config_dir(config, extra_files=extra, **overrides)


def write_tiny_dit_diffusers(path: str | Path, components: dict[str, torch.nn.Module], variant: str) -> Path:
    """Save ``components`` as a diffusers folder with the pipeline's own ``save_pretrained``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    config = tiny_dit_config_dir(components, variant)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(config / "scheduler")
    if variant.startswith("flux"):
        pipe = FluxPipeline(
            scheduler=scheduler, vae=components["vae"], text_encoder=components["text_encoder"],
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"), text_encoder_2=components["text_encoder_2"],
            tokenizer_2=T5TokenizerFast.from_pretrained(config / "tokenizer_2"), transformer=components["transformer"],
        )
    else:
        pipe = StableDiffusion3Pipeline(
            scheduler=scheduler, vae=components["vae"], transformer=components["transformer"],
            text_encoder=components["text_encoder"], tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            text_encoder_2=components["text_encoder_2"], tokenizer_2=CLIPTokenizer.from_pretrained(config / "tokenizer_2"),
            text_encoder_3=components["text_encoder_3"], tokenizer_3=T5TokenizerFast.from_pretrained(config / "tokenizer_3"),
        )
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
