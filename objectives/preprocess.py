"""Image preprocessing of the learned scorers, on tensors: ``[N, 3, H, W]`` floats in [0, 1] in,
normalised model input out, without a PIL round trip.

Each function reproduces one reference pipeline (bicubic, antialiased, as PIL's resize is):

* :func:`resize_shortest_center_crop`: torchvision ``Resize(size) + CenterCrop(crop)`` and
  transformers' ``CLIPImageProcessor`` (PickScore, ImageReward);
* :func:`resize_longest_pad`: HPSv2's ``ResizeMaxSize`` (longest side to ``size``, zero padding
  centred; a square image is only resized);
* :func:`resize_exact`: transformers' ``SiglipImageProcessor`` (both sides to ``size``, aspect not kept).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalize", "resize_exact", "resize_longest_pad", "resize_shortest_center_crop"]


def _resize(images: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def resize_shortest_center_crop(images: Tensor, *, size: int, crop: int | tuple[int, int]) -> Tensor:
    """Shortest side to ``size`` (aspect kept, rounded as torchvision does), then a centred crop."""
    h, w = images.shape[-2:]
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    x = _resize(images.float().clamp(0, 1), new)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    top, left = int(round((x.shape[-2] - ch) / 2.0)), int(round((x.shape[-1] - cw) / 2.0))
    return x[..., top : top + ch, left : left + cw]


def resize_longest_pad(images: Tensor, *, size: int, fill: float = 0.0) -> Tensor:
    """Longest side to ``size`` (aspect kept), padded to ``size`` x ``size`` with ``fill``, centred."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    x = images.float().clamp(0, 1)
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = _resize(x, (nh, nw))
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)


def resize_exact(images: Tensor, *, size: tuple[int, int]) -> Tensor:
    """Both sides to ``size`` = ``(height, width)``."""
    return _resize(images.float().clamp(0, 1), tuple(size))


def normalize(images: Tensor, *, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel."""
    m = torch.tensor(list(mean), dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s
