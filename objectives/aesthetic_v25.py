"""Aesthetic predictor v2.5 (discus0434): a SigLIP so400m image tower and an MLP head, scores ~1-10.

As ``aesthetic_predictor_v2_5.AestheticPredictorV2_5Model`` computes it::

    e = pooler_output(SigLIP vision(image));  score = head(e / ||e||)

``head`` is ``Linear(D, 1024) Linear(1024, 128) Linear(128, 64) Linear(64, 16) Linear(16, 1)``
with dropouts between (identity at inference, no activations); its state dict keys are
``scoring_head.{0,2,4,6,8}.{weight,bias}``. The image is preprocessed as the SigLIP processor's
``preprocessor_config.json`` says (both sides to 384, bicubic; mean = std = 0.5). The authors
call 5.5 and above a good image. Prompts are not read.

Weights: ``siglip_model`` a local folder of ``google/siglip-so400m-patch14-384`` (config, weights,
``preprocessor_config.json``); ``aesthetic_v25_head`` the local ``aesthetic_predictor_v2_5.pth``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from objectives.base import MeanScore, ObjectiveError, check_images
from objectives.pickscore import _weights_group, require_files
from objectives.preprocess import normalize, resize_exact
from objectives.registry import BuildContext, ScorerSettings, register_scorer
from objectives.settings import LocalPath

SIGLIP_SOURCE = "https://huggingface.co/google/siglip-so400m-patch14-384"
HEAD_SOURCE = "https://github.com/discus0434/aesthetic-predictor-v2-5 (models/aesthetic_predictor_v2_5.pth)"
HEAD_WIDTHS = (1024, 128, 64, 16, 1)


class AestheticV25Settings(ScorerSettings):
    siglip_model: LocalPath = Field(description=f"local folder of SigLIP so400m-patch14-384 ({SIGLIP_SOURCE})")
    aesthetic_v25_head: LocalPath = Field(description=f"the aesthetic_predictor_v2_5.pth head ({HEAD_SOURCE})")


def load_v25_head(path: str | Path, *, dim: int) -> nn.Sequential:
    """The v2.5 MLP head (eval mode) from its state dict; shapes checked against ``dim``."""
    from optimizer.checkpoint.safe_read import load_torch_weights_only

    path = Path(path)
    if not path.is_file():
        raise ObjectiveError(f"aesthetic_v25: no head at {path} (download it from {HEAD_SOURCE})")
    state = load_torch_weights_only(path, error=ObjectiveError, what="aesthetic_v25")
    widths = (dim, *HEAD_WIDTHS)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(HEAD_WIDTHS) - 1:
            layers.append(nn.Dropout(0.0))
    head = nn.Sequential(*layers)
    state = {k.removeprefix("scoring_head."): v for k, v in state.items()} if isinstance(state, dict) else state
    try:
        head.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ObjectiveError(f"aesthetic_v25: {path} is not a v2.5 head for {dim}-d SigLIP features: {' '.join(str(exc).split())[:200]}") from None
    return head.eval().requires_grad_(False)


@register_scorer
class AestheticV25(MeanScore):
    """Aesthetic predictor v2.5: an MLP on unit-norm SigLIP so400m image features (maximize,
    ~1-10); see the module docstring."""

    name = "aesthetic_v25"
    higher_is_better = True
    uses_prompts = False
    Settings = AestheticV25Settings
    weights = f"SigLIP so400m-patch14-384 ({SIGLIP_SOURCE}, Apache-2.0) and the v2.5 head ({HEAD_SOURCE}, AGPL-3.0)"
    direction = "maximize"

    def __init__(self, *, model, head: nn.Module, image_processor, batch_size: int = 16) -> None:
        super().__init__()
        self.model, self.head, self.batch_size = model.eval().requires_grad_(False), head, batch_size
        size = image_processor.size
        self.size = (int(size["height"]), int(size["width"]))
        self.mean, self.std = list(image_processor.image_mean), list(image_processor.image_std)
        self.name = "aesthetic_v25"

    @classmethod
    def from_settings(cls, settings: AestheticV25Settings, *, context: BuildContext) -> AestheticV25:
        from transformers import SiglipImageProcessor, SiglipVisionModel

        folder = require_files(settings.siglip_model, [["config.json"], _weights_group(), ["preprocessor_config.json", "processor_config.json"]],
                               what="siglip_model", source=SIGLIP_SOURCE)
        model = SiglipVisionModel.from_pretrained(folder, local_files_only=True)
        head = load_v25_head(settings.aesthetic_v25_head, dim=model.config.hidden_size)
        processor = SiglipImageProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model=model.to(context.device), head=head.to(context.device), image_processor=processor)

    @torch.no_grad()
    def scores(self, images: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            x = normalize(resize_exact(check_images(images[i : i + self.batch_size]), size=self.size), mean=self.mean, std=self.std)
            e = self.model(pixel_values=x.to(device)).pooler_output
            out.append(self.head(e / e.norm(dim=-1, keepdim=True)).squeeze(-1).float().cpu())
        return torch.cat(out)

    def update(self, images: Tensor, *, prompts=()) -> None:
        self.add(self.scores(images))
