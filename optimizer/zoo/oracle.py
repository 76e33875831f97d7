"""An attribute classifier for the digits domain, used only as an *oracle* for held-out evaluation.

A small CNN with five heads (``digit`` 10, ``fg`` 5, ``bg`` 3, ``thickness`` 2, ``slant`` 2) reads a
``[N, 3, 32, 32]`` image in [0, 1] and says what a caption of it should say. It is an evaluator, never a
search objective: it may see the held-out caption combinations (it generates nothing), but it trains
only on the ``train`` *source images*, so its accuracy is measured on the ``test`` source images.

Generated images are not clean renders, so training applies light augmentations a generator's output
may show: sub-pixel shifts and slight rescaling, a little blur, Gaussian noise and small per-channel
colour gain/offset (small enough that no colour turns into another: the colours are labels).

Training is deterministic for a given ``seed`` (same machine, same thread count): the initial weights,
the training samples and the augmentations all come from seeded generators.

    oracle = train_oracle(steps=400, seed=0)
    oracle.predict(images)                       # {"digit": LongTensor[N], "fg": ..., ...}
    oracle.accuracy(images, attributes)          # {"digit": 0.98, ..., "all": 0.97}
    save_oracle(oracle, "out/oracle"); load_oracle("out/oracle")
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optimizer.zoo import domain
from optimizer.zoo.domain import Attributes
from optimizer.zoo.schedule import warmup_cosine

HEADS: dict[str, tuple] = {
    "digit": domain.DIGITS,
    "fg": domain.FOREGROUNDS,
    "bg": domain.BACKGROUNDS,
    "thickness": domain.THICKNESSES,
    "slant": domain.SLANTS,
}
"""Head name -> its classes, in class-index order."""

ATTRIBUTES: tuple[str, ...] = tuple(HEADS)
WEIGHTS_FILE = "oracle.safetensors"
CONFIG_FILE = "oracle.json"
FORMAT = "evomerge-zoo-oracle/1"


def labels(attributes: Sequence[Attributes]) -> dict[str, torch.Tensor]:
    """Class indices ``{head: LongTensor[N]}`` of attribute sets (the oracle's targets)."""
    return {
        name: torch.tensor([classes.index(getattr(a, name)) for a in attributes], dtype=torch.long)
        for name, classes in HEADS.items()
    }


def decode(predictions: dict[str, torch.Tensor]) -> list[dict[str, object]]:
    """Per-image ``{head: class value}`` from ``predict``'s class indices (``fg`` may equal ``bg``)."""
    n = len(next(iter(predictions.values())))
    return [{name: HEADS[name][int(predictions[name][i])] for name in HEADS} for i in range(n)]


class OracleNet(nn.Module):
    """conv(c) x2 -> pool -> conv(2c) x2 -> pool -> conv(4c) -> pool -> fc(hidden) -> five linear heads."""

    def __init__(self, width: int = 16, hidden: int = 128) -> None:
        super().__init__()
        c = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, c), *block(c, c), nn.MaxPool2d(2),  # 16x16
            *block(c, 2 * c), *block(2 * c, 2 * c), nn.MaxPool2d(2),  # 8x8
            *block(2 * c, 4 * c), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * c * 16, hidden),
            nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(classes)) for name, classes in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


class Oracle:
    """A trained :class:`OracleNet` with its config; inference only (eval mode, no grad)."""

    def __init__(self, net: OracleNet, config: dict) -> None:
        self.net = net.eval()
        self.config = dict(config)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> Oracle:
        self.net.to(device)
        return self

    @torch.no_grad()
    def logits(self, images: torch.Tensor, *, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """``{head: FloatTensor[N, classes]}`` for ``images`` ``[N, 3, 32, 32]`` in [0, 1] (on CPU)."""
        if images.ndim != 4 or images.shape[1:] != (3, domain.SIZE, domain.SIZE):
            raise ValueError(f"expected images [N, 3, {domain.SIZE}, {domain.SIZE}], got {list(images.shape)}")
        self.net.eval()
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in HEADS}
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size].to(self.device, torch.float32).clamp(0, 1)
            for name, value in self.net(chunk).items():
                parts[name].append(value.float().cpu())
        if not len(images):
            return {name: torch.zeros(0, len(classes)) for name, classes in HEADS.items()}
        return {name: torch.cat(values) for name, values in parts.items()}

    def predict(self, images: torch.Tensor, *, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """``{head: LongTensor[N]}`` class indices (see :data:`HEADS` for the class order)."""
        return {name: value.argmax(dim=1) for name, value in self.logits(images, batch_size=batch_size).items()}

    def accuracy(self, images: torch.Tensor, attributes: Sequence[Attributes]) -> dict[str, float]:
        """Fraction right per head, and ``"all"``: the fraction of images with all five heads right."""
        if len(images) != len(attributes):
            raise ValueError("one attribute set per image")
        if not len(attributes):
            raise ValueError("no images")
        predicted = self.predict(images)
        target = labels(attributes)
        right = {name: predicted[name] == target[name] for name in HEADS}
        out = {name: right[name].float().mean().item() for name in HEADS}
        out["all"] = torch.stack(list(right.values())).all(dim=0).float().mean().item()
        return out


# --------------------------------------------------------------------------------------------------
# training


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light, label-preserving perturbations like those of a generator's output (seeded)."""
    n = len(images)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    # shifts of up to 2 px (sub-pixel) and +-6% scale, edges replicated
    pixel = 2.0 / domain.SIZE
    scale = uniform(0.94, 1.06)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = uniform(-2.0, 2.0, 2) * pixel
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # a little blur for half of the images: blend towards a 3x3 binomial blur
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3).contiguous()
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    amount = uniform(0.0, 1.0, 1, 1, 1) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    x = x + amount * (blurred - x)
    # small colour gain/offset per channel
    x = x * uniform(0.95, 1.05, 3, 1, 1) + uniform(-0.03, 0.03, 3, 1, 1)
    # Gaussian noise of a random strength
    x = x + uniform(0.0, 0.06, 1, 1, 1) * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1)


def _training_batch(step: int, *, seed: int, batch_size: int) -> tuple[torch.Tensor, list[Attributes]]:
    items = domain.samples(images="train", captions="all", count=batch_size, seed=seed * 1_000_003 + step)
    images = domain.render([s.index for s in items], [s.attributes for s in items])
    return images, [s.attributes for s in items]


def train_oracle(
    *,
    steps: int = 400,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    width: int = 16,
    hidden: int = 128,
    threads: int | None = 1,
    progress: bool = True,
) -> Oracle:
    """Train an oracle on augmented renders of the ``train`` source images, all caption combinations.

    AdamW with a short warm-up and cosine decay, summed cross-entropy over the five heads.
    ``threads``: torch CPU threads while training (restored after; ``None`` leaves the setting alone).
    One thread is about as fast as several for a net this small, much faster on a busy machine, and
    keeps the result independent of the core count. The caller's global torch RNG state is left as
    it was.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    with _threads(threads), torch.random.fork_rng(devices=[]):
        return _train(steps=steps, seed=seed, batch_size=batch_size, lr=lr, width=width, hidden=hidden, progress=progress)


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(*, steps: int, seed: int, batch_size: int, lr: float, width: int, hidden: int, progress: bool) -> Oracle:
    torch.manual_seed(seed)
    net = OracleNet(width=width, hidden=hidden)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = warmup_cosine(optimizer, steps=steps, warmup=max(1, steps // 20))
    start = time.perf_counter()
    net.train()
    for step in range(steps):
        images, attributes = _training_batch(step, seed=seed, batch_size=batch_size)
        images = augment(images, generator)
        target = labels(attributes)
        out = net(images)
        losses = {name: F.cross_entropy(out[name], target[name]) for name in HEADS}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if progress and (step % 50 == 0 or step == steps - 1):
            parts = " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            print(f"oracle step {step + 1}/{steps} loss={loss.item():.3f} ({parts}) {time.perf_counter() - start:.1f}s")
    config = {
        "format": FORMAT,
        "width": width,
        "hidden": hidden,
        "heads": {name: list(classes) for name, classes in HEADS.items()},
        "input": "[N, 3, 32, 32] RGB in [0, 1]",
        "training": {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "seconds": round(time.perf_counter() - start, 1)},
    }
    return Oracle(net, config)


# --------------------------------------------------------------------------------------------------
# files


def save_oracle(oracle: Oracle, folder: str | os.PathLike[str]) -> Path:
    """Write ``oracle.safetensors`` (weights, BatchNorm statistics included) and ``oracle.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in oracle.net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    (folder / CONFIG_FILE).write_text(json.dumps(oracle.config, indent=2) + "\n")
    return folder


def load_oracle(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Oracle:
    """Load an oracle written by :func:`save_oracle`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not an oracle config ({config.get('format')!r})")
    heads = {name: tuple(classes) for name, classes in config["heads"].items()}
    if heads != HEADS:
        raise ValueError(f"oracle heads {heads} do not match this domain's {HEADS}")
    net = OracleNet(width=int(config["width"]), hidden=int(config["hidden"]))
    net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return Oracle(net.to(device), config)


def evaluate_oracle(oracle: Oracle, *, count: int = 2000, seed: int = 1, captions: str = "all", perturb: bool = False) -> dict[str, float]:
    """Accuracy on ``count`` renders of the ``test`` source images (optionally augmented, seeded)."""
    items = domain.samples(images="test", captions=captions, count=count, seed=seed)
    images = domain.render([s.index for s in items], [s.attributes for s in items])
    if perturb:
        images = augment(images, torch.Generator().manual_seed(seed))
    return oracle.accuracy(images, [s.attributes for s in items])
