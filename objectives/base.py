"""The objective protocol: what a study needs from any image scorer.

An objective is a small stateful metric in the torchmetrics style: built once per study (networks
loaded, reference statistics computed), then per trial ``reset()``, ``update()`` with each batch of
rendered images and their prompts, and ``compute()`` to one float. ``direction`` tells Optuna
whether to maximize or minimize it. Images are float ``[N, 3, H, W]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

from optimizer.errors import EvomergeError

Direction = Literal["maximize", "minimize"]


class ObjectiveError(EvomergeError, ValueError):
    """An objective cannot be built or computed from what the user gave (missing weights or
    prompts, too few images); the message names the file or option."""


@runtime_checkable
class Objective(Protocol):
    """Any scorer a study can optimize (see the module docstring for the contract)."""

    name: str
    direction: Direction

    def reset(self) -> None: ...

    def update(self, images: Tensor, *, prompts: Sequence[str]) -> None: ...

    def compute(self) -> float: ...


def check_images(images: Tensor) -> Tensor:
    """``images`` as float ``[N, 3, H, W]`` in [0, 1]; raises ``ValueError`` naming what is wrong."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    return images


class MeanScore:
    """Running mean of per-image scores: the state of objectives that average one score per image
    (CLIP score, aesthetic score). Subclasses set ``name``/``direction`` and call :meth:`add`."""

    name: str

    def __init__(self) -> None:
        self._sum = 0.0
        self._count = 0

    def reset(self) -> None:
        self._sum = 0.0
        self._count = 0

    def add(self, scores: Tensor) -> None:
        self._sum += float(scores.double().sum())
        self._count += len(scores)

    def compute(self) -> float:
        if not self._count:
            raise ObjectiveError(f"{self.name}: no images scored since reset()")
        return self._sum / self._count
