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


def score_folder(*, images: str | os.PathLike[str], objectives: Sequence[Objective], prompts: str | os.PathLike[str] | None = None, batch_size: int = 64) -> list[dict]:
    """Score every image of a folder with each objective; one row per objective."""
    files = image_files(images)
    needing = [o.name for o in objectives if getattr(o, "uses_prompts", True)]
    if needing and prompts is None:
        raise ObjectiveError(f"objective {needing[0]} needs --prompts FILE (one prompt per image)")
    texts = read_prompts(prompts, files) if prompts is not None else [""] * len(files)
    size = image_size(files[0])  # every image is resized to the first one's size (a folder of photos varies)
    for objective in objectives:
        objective.reset()
    for start in range(0, len(files), batch_size):  # each batch is read once and fed to every objective
        batch = load_images(files[start : start + batch_size], size=size)
        for objective in objectives:
            objective.update(batch, prompts=texts[start : start + batch_size])
    return [{"objective": o.name, "direction": o.direction, "value": o.compute(), "images": len(files)} for o in objectives]
