"""Image grids as PNG, for people (and optuna-dashboard artifacts) to look at.

:func:`grid_image` tiles ``[N, 3, H, W]`` images in [0, 1] row-major (``nrow`` per row, default
about square) with torchvision's ``make_grid``; optional ``labels`` are drawn in a strip under
each tile (truncated to the tile's width). :func:`save_grid` writes it atomically (temporary file,
then rename); :func:`grid_png` returns the PNG bytes.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from objectives.base import check_images
from optimizer.atomic import write_bytes_atomic

__all__ = ["grid_image", "grid_png", "save_grid"]

_LABEL_HEIGHT = 12
_PAD = 2


def _fit(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def grid_image(images: Tensor, *, nrow: int | None = None, labels: Sequence[str] | None = None) -> Image.Image:
    """One RGB image tiling ``images`` (see the module docstring)."""
    from torchvision.utils import make_grid

    images = check_images(images).detach().float().cpu().clamp(0, 1)
    if len(images) == 0:
        raise ValueError("no images to put in a grid")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    nrow = nrow or math.ceil(math.sqrt(len(images)))
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    height, width = images.shape[2:]
    if labels is not None:
        strip = torch.ones(len(images), 3, _LABEL_HEIGHT, width)
        images = torch.cat([images, strip], dim=2)
    grid = make_grid(images, nrow=nrow, padding=_PAD, pad_value=1.0)
    picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), mode="RGB")
    if labels is not None:
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default()
        for i, label in enumerate(labels):
            row, col = divmod(i, nrow)
            x = _PAD + col * (width + _PAD)
            y = _PAD + row * (height + _LABEL_HEIGHT + _PAD) + height
            draw.text((x + 1, y), _fit(str(label), draw, font, width - 2), fill=(0, 0, 0), font=font)
    return picture


def grid_png(images: Tensor, *, nrow: int | None = None, labels: Sequence[str] | None = None) -> bytes:
    """The grid of :func:`grid_image` as PNG bytes."""
    buffer = io.BytesIO()
    grid_image(images, nrow=nrow, labels=labels).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(
    images: Tensor, path: str | os.PathLike[str], *, nrow: int | None = None, labels: Sequence[str] | None = None
) -> Path:
    """Write the grid to ``path`` (PNG) atomically and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"grids are PNG files; got {path}")
    data = grid_png(images, nrow=nrow, labels=labels)
    return write_bytes_atomic(path, data)
