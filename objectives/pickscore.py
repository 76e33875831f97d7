"""PickScore (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H fine-tuned on human preferences.

Score of an image and its prompt, as the reference inference code computes it
(github.com/yuvalkirstain/PickScore, README)::

    score = exp(logit_scale) * cos(E_img(image), E_txt(prompt))

with transformers' ``CLIPModel`` (``get_image_features`` / ``get_text_features``, unit-normed) and
its processor: the text padded/truncated to 77 tokens, the image resized (shortest side, bicubic),
centre-cropped and normalised as the processor's ``preprocessor_config.json`` says. For PickScore_v1
``logit_scale`` is ~4.6 (exp ~100), so scores sit around 18-23.

Weights: ``model`` is a local folder of ``yuvalkirstain/PickScore_v1`` (config.json + weights);
``processor`` a folder with the tokenizer and ``preprocessor_config.json`` of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (default: the model folder, if it holds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor

from objectives.base import MeanScore, ObjectiveError, check_images
from objectives.preprocess import normalize, resize_shortest_center_crop
from objectives.registry import BuildContext, ScorerSettings, register_scorer
from objectives.settings import LocalPath

MODEL_SOURCE = "https://huggingface.co/yuvalkirstain/PickScore_v1"
PROCESSOR_SOURCE = "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreSettings(ScorerSettings):
    pickscore_model: LocalPath = Field(description=f"local folder of PickScore_v1 ({MODEL_SOURCE})")
    pickscore_processor: LocalPath | None = Field(default=None, description=f"local folder of the CLIP-H processor ({PROCESSOR_SOURCE}); default: the model folder")


def require_files(folder: str, names: Sequence[Sequence[str]], *, what: str, source: str) -> Path:
    """``folder`` as a Path; :class:`ObjectiveError` naming the first missing file (one of each
    alternative group in ``names``) and where users get it."""
    path = Path(folder)
    if not path.is_dir():
        raise ObjectiveError(f"{what}: no folder at {path} (download it from {source})")
    for group in names:
        if not any((path / n).is_file() for n in group):
            raise ObjectiveError(f"{what}: {path} has no {' or '.join(group)} (download the folder from {source})")
    return path


def _weights_group() -> list[str]:
    return ["model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json"]


@register_scorer
class PickScore(MeanScore):
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` of a CLIP-H fine-tuned on Pick-a-Pic
    preferences (maximize); see the module docstring."""

    name = "pickscore"
    higher_is_better = True
    Settings = PickScoreSettings
    weights = f"PickScore_v1 ({MODEL_SOURCE}) and the CLIP-H processor files ({PROCESSOR_SOURCE}), as local folders; MIT licence"
    direction = "maximize"

    def __init__(self, *, model, processor, batch_size: int = 16) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        size = ip.size.get("shortest_edge") or min(ip.size.get("height", 224), ip.size.get("width", 224))
        crop = ip.crop_size if ip.do_center_crop else {"height": size, "width": size}
        self.size, self.crop = int(size), (int(crop["height"]), int(crop["width"]))
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        self.batch_size = batch_size
        self.name = "pickscore"

    @classmethod
    def from_settings(cls, settings: PickScoreSettings, *, context: BuildContext) -> PickScore:
        from transformers import AutoProcessor, CLIPModel

        model_dir = require_files(settings.pickscore_model, [["config.json"], _weights_group()], what="pickscore_model", source=MODEL_SOURCE)
        proc_dir = require_files(settings.pickscore_processor or settings.pickscore_model,
                                 [["preprocessor_config.json", "processor_config.json"], ["tokenizer.json", "vocab.json"]], what="pickscore_processor", source=PROCESSOR_SOURCE)
        model = CLIPModel.from_pretrained(model_dir, local_files_only=True).to(context.device)
        return cls(model=model, processor=AutoProcessor.from_pretrained(proc_dir, local_files_only=True))

    def pixel_values(self, images: Tensor) -> Tensor:
        x = resize_shortest_center_crop(check_images(images), size=self.size, crop=self.crop)
        return normalize(x, mean=self.mean, std=self.std)

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image PickScore of ``images`` with their own ``prompts``."""
        if len(images) != len(prompts):
            raise ObjectiveError(f"pickscore: {len(images)} images but {len(prompts)} prompts")
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[i : i + self.batch_size]).to(device)
            text = self.tokenizer(list(prompts[i : i + self.batch_size]), padding="max_length", truncation=True, max_length=77, return_tensors="pt").to(device)
            img = _features(self.model.get_image_features(pixel_values=pixels))
            txt = _features(self.model.get_text_features(**text))
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            out.append((self.model.logit_scale.exp() * (img * txt).sum(-1)).float().cpu())
        return torch.cat(out)

    def update(self, images: Tensor, *, prompts: Sequence[str]) -> None:
        self.add(self.scores(images, list(prompts)))


def _features(output) -> Tensor:
    """transformers 5 may return a model output instead of the projected tensor."""
    if isinstance(output, Tensor):
        return output
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, name, None)
        if isinstance(value, Tensor):
            return value
    raise ObjectiveError(f"pickscore: unexpected feature output {type(output).__name__}")
