"""The zoo's model components: configs, seeded builders, the sampling pipeline.

Every zoo model is a real Stable Diffusion 1.x-topology model built with the diffusers /
transformers classes, only small:

* :func:`build_vae`: an ``AutoencoderKL`` with 3 levels (downsampling factor 4), so a 32x32 RGB image
  is an 8x8x4 latent. One VAE is trained and shared by every model of the zoo.
* :func:`build_text_encoder`: an HF ``CLIPTextModel`` (quick_gelu, 77 positions, like SD1's) over
  the zoo tokenizer's vocabulary (:mod:`optimizer.zoo.tokenizer`).
* :func:`build_unet`: a ``UNet2DConditionModel`` with SD1's exact block structure (CrossAttnDownBlock2D
  x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D x3,
  ``layers_per_block=2``, conv ``proj_in``), so its LDM keys fill all 26 merge blocks of the ``sd1``
  layout; only the channels are small.

:func:`build_pipeline` assembles a ``StableDiffusionPipeline`` (DPM-Solver++ scheduler over SD1's
noise schedule) and :func:`generate` samples seeded images from it as ``[N, 3, 32, 32]`` in [0, 1].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from optimizer.zoo import domain, tokenizer

__all__ = [
    "NOISE_SCHEDULE",
    "TEXT_ENCODER_CONFIG",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "build_pipeline",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "encode_prompts",
    "generate",
    "parameter_count",
]

#: ``AutoencoderKL`` config: 32x32x3 <-> 8x8x4. ``scaling_factor`` is set after training.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": domain.SIZE,
}

#: ``CLIPTextConfig`` keyword arguments (the vocabulary and special token ids come from the tokenizer).
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": tokenizer.MAX_LENGTH,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
}

#: ``UNet2DConditionModel`` config: SD1's blocks, small channels, 8x8x4 latents.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": domain.SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 32, 32, 32),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": TEXT_ENCODER_CONFIG["hidden_size"],
    "attention_head_dim": 4,  # diffusers' SD1 name for the number of heads
}

#: SD1's training noise schedule (``DDPMScheduler`` / sampling scheduler keyword arguments).
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def parameter_count(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def build_vae(*, seed: int, scaling_factor: float = 1.0, **config: Any):
    """A freshly initialised ``AutoencoderKL`` (``torch.manual_seed(seed)`` first); ``config``
    replaces entries of :data:`VAE_CONFIG` (smaller test models)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**VAE_CONFIG, **config}, scaling_factor=scaling_factor)


def build_text_encoder(*, seed: int, **config: Any):
    """A freshly initialised ``CLIPTextModel`` over the zoo tokenizer's vocabulary; ``config``
    replaces entries of :data:`TEXT_ENCODER_CONFIG`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = tokenizer.vocabulary()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[tokenizer.BOS],
        eos_token_id=vocab[tokenizer.EOS],
        pad_token_id=vocab[tokenizer.EOS],
        **{**TEXT_ENCODER_CONFIG, **config},
    )
    torch.manual_seed(seed)
    return CLIPTextModel(text_config)


def build_unet(*, seed: int, **config: Any):
    """A freshly initialised SD1-topology ``UNet2DConditionModel``; ``config`` replaces entries of
    :data:`UNET_CONFIG`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **config})


def encode_prompts(text_encoder, tok, prompts: Sequence[str]) -> torch.Tensor:
    """``[N, 77, hidden]`` last hidden states of ``prompts`` padded to 77 tokens, as SD1 pipelines do."""
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def build_pipeline(*, vae, text_encoder, unet, tokenizer_dir: str | os.PathLike[str] | None = None):
    """A ``StableDiffusionPipeline`` from the components, the zoo tokenizer and DPM-Solver++ (SD1 schedule).

    No safety checker. ``tokenizer_dir`` is a folder written by :func:`tokenizer.write_tokenizer`
    (a temporary one is written when ``None``).
    """
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer.load_tokenizer(tokenizer_dir),
        unet=unet.eval(),
        scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe, *, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20, guidance: float = 4.0, batch_size: int = 100
) -> torch.Tensor:
    """Sample one image per ``(prompt, seed)``: ``[N, 3, 32, 32]`` float32 in [0, 1] (CPU).

    Each image's initial noise comes from ``torch.Generator().manual_seed(seed)``, so an image
    does not depend on the batch it is generated in.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        images = pipe(
            prompt=list(prompts[chunk]),
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            height=domain.SIZE,
            width=domain.SIZE,
            output_type="pt",
        ).images
        out.append(images.float().cpu().clamp(0, 1))
    return torch.cat(out) if out else torch.empty(0, 3, domain.SIZE, domain.SIZE)
