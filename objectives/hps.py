"""HPSv2.1 (Wu et al. 2023, "Human Preference Score v2"): an open_clip ViT-H-14 fine-tuned on human preferences.

Score of an image and its prompt, as ``hpsv2.img_score.score`` computes it::

    score = cos(E_img(image), E_txt(prompt))      # image_features @ text_features.T, diagonal

with unit-norm open_clip features (no logit scale; HPSv2.1 scores sit around 0.25-0.35). The image
is preprocessed as HPSv2's ``preprocess_val``: longest side resized to the model's input size
(bicubic), zero-padded to a square, normalised with the model's mean/std (OpenAI's for ViT-H-14).
The prompt goes through open_clip's tokenizer for the model.

Weights: ``hps_checkpoint`` is the local ``HPS_v2.1_compressed.pt`` (``{"state_dict": ...}``,
loaded weights-only into ``open_clip.create_model(hps_model)``; ``hps_model`` defaults to
``ViT-H-14`` and names another open_clip architecture only for tests and other HPS releases).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from objectives.base import MeanScore, ObjectiveError, check_images
from objectives.preprocess import normalize, resize_longest_pad
from objectives.registry import BuildContext, ScorerSettings, register_scorer
from objectives.settings import LocalPath

SOURCE = "https://huggingface.co/xswu/HPSv2 (HPS_v2.1_compressed.pt)"


class HPSSettings(ScorerSettings):
    hps_checkpoint: LocalPath = Field(description=f"the HPS_v2.1_compressed.pt file ({SOURCE})")
    hps_model: str = Field(default="ViT-H-14", description="open_clip architecture of the checkpoint")


def load_hps(settings: HPSSettings, *, device: str = "cpu"):
    """``(model, tokenizer)``: the open_clip architecture with the HPS checkpoint loaded (strict)."""
    import open_clip

    from optimizer.checkpoint.safe_read import load_torch_weights_only

    path = Path(settings.hps_checkpoint)
    if not path.is_file():
        raise ObjectiveError(f"hps: no checkpoint at {path} (download HPS_v2.1_compressed.pt from {SOURCE})")
    if settings.hps_model not in open_clip.list_models():
        raise ObjectiveError(f"hps: unknown open_clip model {settings.hps_model!r}")
    checkpoint = load_torch_weights_only(path, error=ObjectiveError, what="hps")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ObjectiveError(f"hps: {path}: expected {{'state_dict': ...}}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = open_clip.create_model(settings.hps_model, pretrained=None, device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ObjectiveError(f"hps: {path} does not fit open_clip {settings.hps_model}: {first}") from None
    return model.to(device).eval().requires_grad_(False), open_clip.get_tokenizer(settings.hps_model)


@register_scorer
class HPSv2(MeanScore):
    """HPSv2.1: the cosine of open_clip ViT-H-14 image and prompt features after HPS fine-tuning
    (maximize); see the module docstring."""

    name = "hps"
    higher_is_better = True
    Settings = HPSSettings
    weights = f"HPS_v2.1_compressed.pt ({SOURCE}); the architecture is open_clip's ViT-H-14; Apache-2.0"
    direction = "maximize"

    def __init__(self, *, model, tokenizer, batch_size: int = 16) -> None:
        super().__init__()
        from objectives.clip_score import image_normalization

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        size = model.visual.image_size
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean, std = image_normalization(model)
        self.mean, self.std = mean.flatten().tolist(), std.flatten().tolist()
        self.name = "hps"

    @classmethod
    def from_settings(cls, settings: HPSSettings, *, context: BuildContext) -> HPSv2:
        model, tokenizer = load_hps(settings, device=context.device)
        return cls(model=model, tokenizer=tokenizer)

    def pixel_values(self, images: Tensor) -> Tensor:
        return normalize(resize_longest_pad(check_images(images), size=self.size), mean=self.mean, std=self.std)

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image HPS of ``images`` with their own ``prompts``."""
        if len(images) != len(prompts):
            raise ObjectiveError(f"hps: {len(images)} images but {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[i : i + self.batch_size]).to(device)
            text = self.tokenizer(list(prompts[i : i + self.batch_size])).to(device)
            img = self.model.encode_image(pixels, normalize=True)
            txt = self.model.encode_text(text, normalize=True)
            out.append((img * txt).sum(-1).float().cpu())
        return torch.cat(out)

    def update(self, images: Tensor, *, prompts: Sequence[str]) -> None:
        self.add(self.scores(images, list(prompts)))
