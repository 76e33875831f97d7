"""The embedded domain: real handwritten digits rendered as coloured glyphs, with captions.

Source images are scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped with
the package). Each sample is rendered at 32x32 RGB as a glyph of colour ``fg`` on a background of
colour ``bg``, with a stroke ``thickness`` (thin / bold) and a ``slant`` (upright / italic), and is
captioned ``"a bold italic red digit 7 on a black background"``.

Splits are deterministic:

* *images*: the source digits are split 80/20 by a fixed permutation (``train`` / ``test``);
* *captions*: a fixed 20% of the ``(digit, fg, bg)`` combinations are **held out**: no model is
  ever trained on them, so prompt following is measured on captions the models never saw.

Rendering is a pure function of ``(source index, attributes)``: the same sample gives the same
pixels on every machine (float32 ops on CPU, no randomness).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 205, 40),
    "white": (240, 240, 240),
    "black": (16, 16, 16),
    "gray": (128, 128, 128),
}
FOREGROUNDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white")
BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")
THICKNESSES: tuple[str, ...] = ("thin", "bold")
SLANTS: tuple[str, ...] = ("upright", "italic")
DIGITS: tuple[int, ...] = tuple(range(10))

HELD_OUT_FRACTION = 0.2
IMAGE_TEST_FRACTION = 0.2
_SPLIT_SEED = 20261122


@dataclass(frozen=True, order=True)
class Attributes:
    """What a caption says about an image (and what the oracle predicts)."""

    digit: int
    fg: str
    bg: str
    thickness: str = "thin"
    slant: str = "upright"

    def __post_init__(self) -> None:
        if self.digit not in DIGITS:
            raise ValueError(f"digit must be 0..9, got {self.digit!r}")
        if self.fg not in FOREGROUNDS:
            raise ValueError(f"foreground {self.fg!r} is not one of {FOREGROUNDS}")
        if self.bg not in BACKGROUNDS:
            raise ValueError(f"background {self.bg!r} is not one of {BACKGROUNDS}")
        if self.fg == self.bg:
            raise ValueError(f"foreground and background are both {self.fg!r}")
        if self.thickness not in THICKNESSES:
            raise ValueError(f"thickness {self.thickness!r} is not one of {THICKNESSES}")
        if self.slant not in SLANTS:
            raise ValueError(f"slant {self.slant!r} is not one of {SLANTS}")

    @property
    def combination(self) -> tuple[int, str, str]:
        """The ``(digit, fg, bg)`` triple that decides the caption split."""
        return (self.digit, self.fg, self.bg)

    def caption(self) -> str:
        """``"a bold italic red digit 7 on a black background"``."""
        return f"a {self.thickness} {self.slant} {self.fg} digit {self.digit} on a {self.bg} background"


def all_combinations() -> list[tuple[int, str, str]]:
    """Every valid ``(digit, fg, bg)`` triple, sorted."""
    return [(d, f, b) for d, f, b in itertools.product(DIGITS, FOREGROUNDS, BACKGROUNDS) if f != b]


@cache
def held_out_combinations() -> frozenset[tuple[int, str, str]]:
    """The fixed 20% of ``(digit, fg, bg)`` triples that no model trains on.

    Stratified so every digit, every foreground and every background still appears in training.
    """
    combos = all_combinations()
    rng = random.Random(_SPLIT_SEED)
    rng.shuffle(combos)
    target = round(HELD_OUT_FRACTION * len(combos))
    held: set[tuple[int, str, str]] = set()
    for combo in combos:
        if len(held) == target:
            break
        trial = held | {combo}
        kept = [c for c in all_combinations() if c not in trial]
        per_digit = sum(1 for c in kept if c[0] == combo[0])
        covered = {c[1] for c in kept} == set(FOREGROUNDS) and {c[2] for c in kept} == set(BACKGROUNDS)
        if covered and per_digit >= 9:  # every digit keeps most of its training combinations
            held = trial
    return frozenset(held)


def is_held_out(attributes: Attributes) -> bool:
    return attributes.combination in held_out_combinations()


@cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


@cache
def image_split() -> dict[str, tuple[int, ...]]:
    """Source-image indices of the ``train`` and ``test`` splits (fixed permutation, 80/20)."""
    _, targets = _digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(targets))
    n_test = round(IMAGE_TEST_FRACTION * len(targets))
    return {"train": tuple(sorted(order[n_test:].tolist())), "test": tuple(sorted(order[:n_test].tolist()))}


def source_digit(index: int) -> int:
    """The label of source image ``index``."""
    return int(_digits()[1][index])


def _glyph_masks(indices: Sequence[int], *, thickness: Sequence[str], slant: Sequence[str]) -> torch.Tensor:
    """``[N, 1, 32, 32]`` stroke masks in [0, 1] for source images, styled."""
    images, _ = _digits()
    x = torch.from_numpy(images[list(indices)]).unsqueeze(1)  # N,1,8,8
    x = F.pad(x, (1, 1, 1, 1))  # margin so strokes and slant stay inside the frame
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    bold = torch.tensor([t == "bold" for t in thickness]).view(-1, 1, 1, 1)
    dilated = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, kernel_size=3, stride=1, padding=1)
    x = torch.where(bold, dilated, (x + eroded) / 2)
    shear = torch.tensor([0.35 if s == "italic" else 0.0 for s in slant], dtype=torch.float32)
    theta = torch.zeros(len(indices), 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 1] = shear  # x' = x + shear * y: the top leans right
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ((x - 0.15) / 0.55).clamp(0, 1)  # crisp strokes, soft anti-aliased edges


def render(indices: Sequence[int], attributes: Sequence[Attributes]) -> torch.Tensor:
    """Render source digits ``indices`` with ``attributes`` as ``[N, 3, 32, 32]`` floats in [0, 1].

    The caption's digit must be the source image's label.
    """
    if len(indices) != len(attributes):
        raise ValueError("one attribute set per index")
    for i, a in zip(indices, attributes, strict=True):
        if source_digit(i) != a.digit:
            raise ValueError(f"source image {i} is a {source_digit(i)}, not a {a.digit}")
    mask = _glyph_masks(indices, thickness=[a.thickness for a in attributes], slant=[a.slant for a in attributes])
    fg = torch.tensor([COLOURS[a.fg] for a in attributes], dtype=torch.float32).view(-1, 3, 1, 1) / 255.0
    bg = torch.tensor([COLOURS[a.bg] for a in attributes], dtype=torch.float32).view(-1, 3, 1, 1) / 255.0
    return bg * (1 - mask) + fg * mask


@dataclass(frozen=True)
class Sample:
    index: int
    attributes: Attributes

    @property
    def caption(self) -> str:
        return self.attributes.caption()


def samples(*, images: str, captions: str, count: int, seed: int) -> list[Sample]:
    """``count`` deterministic samples.

    ``images``: ``"train"`` or ``"test"`` source images. ``captions``: ``"train"`` (combinations
    models train on), ``"held_out"`` (the held-out combinations) or ``"all"``. Attributes are drawn
    uniformly among the allowed combinations and styles, the source image uniformly among the split's
    images of that digit.
    """
    if images not in ("train", "test"):
        raise ValueError(f"images must be 'train' or 'test', got {images!r}")
    held = held_out_combinations()
    combos = all_combinations()
    if captions == "train":
        combos = [c for c in combos if c not in held]
    elif captions == "held_out":
        combos = sorted(held)
    elif captions != "all":
        raise ValueError(f"captions must be 'train', 'held_out' or 'all', got {captions!r}")
    by_digit: dict[int, list[int]] = {d: [] for d in DIGITS}
    for i in image_split()[images]:
        by_digit[source_digit(i)].append(i)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        digit, fg, bg = rng.choice(combos)
        attrs = Attributes(digit=digit, fg=fg, bg=bg, thickness=rng.choice(THICKNESSES), slant=rng.choice(SLANTS))
        out.append(Sample(index=rng.choice(by_digit[digit]), attributes=attrs))
    return out


def batches(items: Sequence[Sample], *, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str], list[Sample]]]:
    """``(images [B,3,32,32] in [0,1], captions, samples)`` in order."""
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        yield render([s.index for s in chunk], [s.attributes for s in chunk]), [s.caption for s in chunk], chunk


def parse_caption(caption: str) -> Attributes:
    """The attributes of a full caption ``"a {thickness} {slant} {fg} digit {d} on a {bg} background"``
    (the inverse of :meth:`Attributes.caption`); ``ValueError`` for any other text."""
    words = caption.split()
    if len(words) != 10 or words[0] != "a" or words[4] != "digit" or words[6:8] != ["on", "a"] or words[9] != "background":
        raise ValueError(f"not a full zoo caption: {caption!r}")
    try:
        digit = int(words[5])
    except ValueError:
        raise ValueError(f"not a full zoo caption: {caption!r}") from None
    return Attributes(digit=digit, fg=words[3], bg=words[8], thickness=words[1], slant=words[2])
