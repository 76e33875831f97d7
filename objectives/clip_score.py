"""CLIP score with any open_clip model: per-image ``max(100 cos(image, prompt), 0)``, as an objective.

:class:`CLIPScoreObjective` (maximize) averages torchmetrics' CLIPScore definition over every image
seen since ``reset``: ``100 * max(cos(E_img(image), E_txt(prompt)), 0)``, with unit-norm embeddings.
Build it from an open_clip model name with a pretrained tag or a local weights file
(:meth:`CLIPScoreObjective.from_pretrained`: ``"ViT-L-14"`` with ``"openai"`` is what SD users expect;
nothing is downloaded when a path is given), or from a loaded model and tokenizer. A model that
open_clip does not know is looked up among the installed plug-ins (entry-point group
``evomerge.open_clip_models``, see :mod:`optimizer.plugins`), which register it with open_clip on
request: the embedded zoo's tiny ``"evomerge-digits-clip"`` loads that way, named with its weights
file like any other model. A study that names no model gets ``ViT-L-14`` with OpenAI's weights.

Images are float ``[N, 3, H, W]`` in [0, 1]; they are resized to the model's input size (bicubic,
antialiased) and normalised with the model's mean/std here, without a PIL round trip.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from objectives.base import MeanScore, ObjectiveError, check_images
from objectives.registry import BuildContext, ScorerSettings, register_scorer
from objectives.settings import PathOrTag, is_path_like

#: the open_clip model and weights a study uses when it names none: what SD users mean by "CLIP score"
DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_WEIGHTS = "openai"


class OpenCLIPSettings(ScorerSettings):
    """An open_clip model: a name from ``open_clip.list_models()`` (or a plug-in's) and its weights."""

    clip_model: str = Field(default=DEFAULT_CLIP_MODEL, description="open_clip model name, e.g. ViT-L-14")
    clip_weights: PathOrTag = Field(default=DEFAULT_CLIP_WEIGHTS,
                                    description="open_clip pretrained tag (e.g. openai, downloaded by open_clip) or a local weights file")


def shared_open_clip(settings: OpenCLIPSettings, *, context: BuildContext):
    """``(model, tokenizer)`` of ``settings``, loaded once per study (CLIP score, the aesthetic head
    and CLIP-feature FID share it)."""
    weights = settings.clip_weights
    key = ("open_clip", settings.clip_model, weights, context.device)
    return context.shared(key, lambda: load_open_clip(settings.clip_model, pretrained=weights, device=context.device))


def image_normalization(model) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` as ``[1, 3, 1, 1]`` tensors: the model's preprocess config (OpenAI's by default)."""
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def prepare_images(model, images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> the model's normalised input (resized if not the model's size)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {list(images.shape)}")
    mean, std = image_normalization(model)
    size = model.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    x = images.to(_model_device(model), torch.float32).clamp(0, 1)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return (x - mean.to(x.device)) / std.to(x.device)


def encode_images(model, images: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Unit-norm image embeddings ``[N, D]`` of ``images`` in [0, 1] (no grad)."""
    with torch.no_grad():
        parts = [
            model.encode_image(prepare_images(model, images[i : i + batch_size]), normalize=True)
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(parts).float()


def encode_captions(model, tokenizer, captions: Sequence[str], *, batch_size: int = 512) -> torch.Tensor:
    """Unit-norm text embeddings ``[N, D]`` (no grad)."""
    captions = list(captions)
    device = _model_device(model)
    with torch.no_grad():
        parts = [
            model.encode_text(tokenizer(captions[i : i + batch_size]).to(device), normalize=True)
            for i in range(0, len(captions), batch_size)
        ]
    return torch.cat(parts).float()


def clip_score(model, tokenizer, images: torch.Tensor, captions: Sequence[str], *, batch_size: int = 512) -> torch.Tensor:
    """Per-image CLIPScore ``max(100 * cos(image_i, caption_i), 0)``, a ``[N]`` float tensor.

    ``images``: ``[N, 3, H, W]`` in [0, 1] (normalised with the model's mean/std here; resized to the
    model's size if needed). ``captions``: ``N`` strings. ``tokenizer``: as ``open_clip.get_tokenizer``.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not len(captions):
        return torch.zeros(0)
    was_training = model.training
    model.eval()
    try:
        image_features = encode_images(model, images, batch_size=batch_size)
        text_features = encode_captions(model, tokenizer, captions, batch_size=batch_size)
    finally:
        model.train(was_training)
    return (100 * (image_features * text_features).sum(dim=-1)).clamp(min=0).cpu()


def load_open_clip(model_name: str, *, pretrained: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` in eval mode: open_clip's own loader; a model open_clip does not know is
    registered by the installed plug-in of that name first (group ``evomerge.open_clip_models``).

    ``pretrained``: a local weights file, or a pretrained tag open_clip downloads (``"openai"``);
    ``None`` is random weights (tests only). Every failure is one :class:`ObjectiveError` line."""
    import open_clip

    from optimizer.plugins import OPEN_CLIP_GROUP, entry_point

    if model_name not in open_clip.list_models():
        try:
            register = entry_point(OPEN_CLIP_GROUP, model_name)
        except ValueError as exc:
            raise ObjectiveError(str(exc)) from None
        if register is not None:
            register()
    if model_name not in open_clip.list_models():
        raise ObjectiveError(f"unknown open_clip model {model_name!r} (open_clip.list_models() lists the known ones)")
    if pretrained is not None and is_path_like(str(pretrained)) and not os.path.isfile(pretrained):
        raise ObjectiveError(f"no CLIP weights file at {pretrained}")
    if pretrained is not None and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if str(pretrained) not in tags:
            known = ", ".join(tags) if tags else "none: give a local weights file"
            raise ObjectiveError(f"{model_name} has no open_clip pretrained tag {str(pretrained)!r} (its tags: {known})")
    try:
        with _open_clip_logs_silenced():  # it logs the failure on the root logger before raising it
            model = open_clip.create_model(model_name, pretrained=str(pretrained) if pretrained is not None else None, device=device)
    except (OSError, RuntimeError, ValueError) as exc:  # no network (HF_HUB_OFFLINE), a broken download or file
        first = " ".join(str(exc).split()).split(". ")[0][:160]
        raise ObjectiveError(f"cannot load open_clip {model_name} weights {str(pretrained)!r} ({first}); offline, give clip_weights a local file") from None
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(model_name)



@contextlib.contextmanager
def _open_clip_logs_silenced() -> Iterator[None]:
    """Drop open_clip's own log records while the block runs (its errors are raised, and reported once)."""
    def drop(record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@register_scorer
class CLIPScoreObjective(MeanScore):
    """CLIP score: the mean of ``max(100 cos(E_img, E_txt), 0)`` over the (image, prompt) pairs seen
    since :meth:`reset` (torchmetrics' CLIPScore), with any open_clip model (maximize)."""

    name = "clip"
    higher_is_better = True
    Settings = OpenCLIPSettings
    weights = "open_clip weights: a pretrained tag (downloaded by open_clip; default ViT-L-14 openai) or a local file"
    direction = "maximize"

    def __init__(self, *, model, tokenizer, batch_size: int = 64, name: str = "clip") -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_pretrained(
        cls, model_name: str, *, pretrained: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu", **kwargs
    ) -> CLIPScoreObjective:
        model, tokenizer = load_open_clip(model_name, pretrained=pretrained, device=device)
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    @classmethod
    def from_settings(cls, settings: OpenCLIPSettings, *, context: BuildContext) -> CLIPScoreObjective:
        model, tokenizer = shared_open_clip(settings, context=context)
        return cls(model=model, tokenizer=tokenizer)

    def update(self, images: torch.Tensor, *, prompts: Sequence[str]) -> None:
        check_images(images)
        self.add(clip_score(self.model, self.tokenizer, images, list(prompts), batch_size=self.batch_size))


class CLIPImageFeatures(torch.nn.Module):
    """An open_clip image tower as a feature extractor for FID / KID (``[N, 3, H, W]`` in [0, 1] ->
    unit-norm ``[N, D]``): e.g. the zoo CLIP's, whose features know digits and colours where
    InceptionV3's ImageNet features barely see a 32x32 glyph."""

    def __init__(self, model, *, name: str = "open_clip", batch_size: int = 256) -> None:
        super().__init__()
        self.model = model.eval()
        self.name = f"clip-image:{name}"
        self.batch_size = batch_size
        with torch.no_grad():
            self.num_features = int(encode_images(self.model, torch.rand(1, 3, 32, 32)).shape[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode_images(self.model, check_images(images), batch_size=self.batch_size)
