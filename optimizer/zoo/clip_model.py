"""A tiny open_clip model for the digits domain, usable "like any open_clip model".

:func:`register_zoo_clip` adds the architecture ``"evomerge-digits-clip"`` to open_clip's model registry
(``open_clip.add_model_config`` on a JSON file written to ``$EVOMERGE_CACHE/zoo/open_clip/``, next to
the zoo tokenizer's files, which the config names as its ``hf_tokenizer_name``) and registers its
vision trunk with timm. After that, plain open_clip calls work offline::

    model, _, preprocess = open_clip.create_model_and_transforms(
        "evomerge-digits-clip", pretrained="/path/to/zoo_clip.safetensors")   # or a .pt state dict
    tokenizer = open_clip.get_tokenizer("evomerge-digits-clip")

* vision tower: open_clip's ``TimmModel`` around :class:`DigitsCNN` (timm name
  ``evomerge_digits_cnn``), a small GroupNorm CNN for 32x32 images whose last linear layer is the
  projection to ``embed_dim``. (open_clip's own ViT / ModifiedResNet towers, tried first, did not
  learn the digit's shape in a CPU budget of minutes: they matched colours and style but put the
  digit word barely above chance; this CNN learns it in a few hundred steps.)
* text tower: open_clip's causal transformer over the zoo tokenizer's 568 tokens (width 64, 3 layers,
  4 heads), pooled at the first end-of-text token (``pool_type="eos"``); context length 32 (a domain
  caption is 12 tokens with its start/end tokens; longer text is truncated, keeping the end token);
* ``embed_dim`` 64; preprocessing is open_clip's default for a file checkpoint: resize/centre-crop to
  32, OpenAI mean/std. ``preprocess`` takes PIL images (32x32 ones pass through unresized).

:func:`train_zoo_clip` trains it from scratch with open_clip's ``ClipLoss`` on renders of the
``train`` source images with ``train`` captions only (held-out combinations stay unseen). Each batch
holds pairwise different captions (so no in-batch negative is really a positive), half of them in
groups that differ only in the digit (hard negatives), and gets light augmentations (shift, blur,
noise, small colour gain). Deterministic for a seed (single-threaded by default).

:func:`clip_score` is torchmetrics' CLIPScore per image: ``max(100 * cos(image, caption), 0)``.
"""

from __future__ import annotations

import json
import math
import os
import time
from functools import cache
from pathlib import Path

import torch
from torch import nn

from optimizer.zoo import domain
from optimizer.zoo import tokenizer as zoo_tokenizer
from optimizer.zoo.schedule import warmup_cosine

MODEL_NAME = "evomerge-digits-clip"
VISION_TOWER = "evomerge_digits_cnn"
CONTEXT_LENGTH = 32
EMBED_DIM = 64

__all__ = [
    "CONTEXT_LENGTH",
    "EMBED_DIM",
    "MODEL_NAME",
    "VISION_TOWER",
    "DigitsCNN",
    "caption_matching",
    "evomerge_digits_cnn",
    "clip_score",
    "encode_captions",
    "encode_images",
    "image_normalization",
    "load_zoo_clip",
    "model_config",
    "prepare_images",
    "register_zoo_clip",
    "save_zoo_clip",
    "train_zoo_clip",
]


class DigitsCNN(nn.Module):
    """The vision tower's trunk: a small CNN for 32x32 images that keeps the glyph's layout.

    Three stages of two 3x3 conv + GroupNorm + GELU (``width``, ``2 width``, ``4 width`` channels; max
    pool after each: 32 -> 16 -> 8 -> 4), then the 4x4 map is flattened (so *where* strokes are stays
    known, which digits need) into an MLP whose last layer is the timm "classifier" that open_clip uses
    as the projection to ``embed_dim``. GroupNorm, not BatchNorm: an image's embedding does not depend
    on the rest of its batch, in train or eval mode. Registered with timm as ``evomerge_digits_cnn``.
    """

    def __init__(self, num_classes: int = EMBED_DIM, *, in_chans: int = 3, width: int = 16, hidden: int = 256, groups: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for cout in (width, 2 * width, 4 * width):
            for _ in range(2):
                layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.GELU()]
                cin = cout
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pre_logits = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, hidden), nn.GELU())
        self.num_features = hidden
        self.num_classes = num_classes
        self.fc = nn.Linear(hidden, num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (domain.SIZE, domain.SIZE):
            raise ValueError(f"{VISION_TOWER} takes {domain.SIZE}x{domain.SIZE} images, got {list(x.shape)}")
        return self.forward_head(self.forward_features(x))


def evomerge_digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    """timm entry point of the vision tower (registered by :func:`register_zoo_clip`)."""
    if pretrained:
        raise ValueError(f"{VISION_TOWER} has no pretrained weights")
    for ignored in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "global_pool", "drop_rate", "drop_path_rate"):
        kwargs.pop(ignored, None)
    return DigitsCNN(**kwargs)


def model_config(tokenizer_folder: str | os.PathLike[str]) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    eos_id = zoo_tokenizer.vocabulary()[0][zoo_tokenizer.EOS]
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "image_size": domain.SIZE,
            "timm_model_name": VISION_TOWER,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "",
        },
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": zoo_tokenizer.vocab_size(),
            "hf_tokenizer_name": str(Path(tokenizer_folder).resolve()),
            "width": 64,
            "heads": 4,
            "layers": 3,
            "mlp_ratio": 2.0,
            "pool_type": "eos",
            "eos_id": eos_id,
            "pad_id": eos_id,
        },
    }


def _registry_folder() -> Path:
    from optimizer.checkpoint.hashing import cache_root

    return cache_root() / "zoo" / "open_clip"


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)  # atomic: a concurrent reader sees the old or the new file


def register_zoo_clip(folder: str | os.PathLike[str] | None = None) -> str:
    """Add ``"evomerge-digits-clip"`` to open_clip's registry; returns the model name.

    Writes the tokenizer files and ``evomerge-digits-clip.json`` under ``folder`` (default
    ``$EVOMERGE_CACHE/zoo/open_clip``). Safe to call repeatedly; the latest registration wins.
    """
    import open_clip
    import timm
    from open_clip import factory

    if VISION_TOWER not in timm.list_models(VISION_TOWER):
        from timm.models import register_model

        register_model(evomerge_digits_cnn)
    folder = Path(folder) if folder is not None else _registry_folder()
    tokenizer_folder = folder / "tokenizer"
    tokenizer_folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".tokenizer.{os.getpid()}"
    zoo_tokenizer.write_tokenizer(staging)
    for file in sorted(staging.iterdir()):
        _write_if_changed(tokenizer_folder / file.name, file.read_text(encoding="utf-8"))
        file.unlink()
    staging.rmdir()
    config_file = (folder / f"{MODEL_NAME}.json").resolve()
    _write_if_changed(config_file, json.dumps(model_config(tokenizer_folder), indent=2) + "\n")
    paths = factory._MODEL_CONFIG_PATHS
    if config_file in paths:  # move it last, so it wins over another folder's registration
        paths.remove(config_file)
    open_clip.add_model_config(config_file)
    return MODEL_NAME


# --------------------------------------------------------------------------------------------------
# using a model


# The generic open_clip helpers live in objectives.clip_score (any open_clip model); re-exported here.
from objectives.clip_score import (  # noqa: E402
    clip_score,
    encode_captions,
    encode_images,
    image_normalization,
    prepare_images,
)

# --------------------------------------------------------------------------------------------------
# files


def save_zoo_clip(model, path: str | os.PathLike[str]) -> Path:
    """Write the model's state dict to ``path``: safetensors for ``*.safetensors``, else ``torch.save``.

    Either file loads with ``open_clip.create_model_and_transforms(MODEL_NAME, pretrained=path)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"open_clip_model": MODEL_NAME})
    else:
        torch.save(state, path)
    return path


def load_zoo_clip(path: str | os.PathLike[str], *, device: str | torch.device = "cpu"):
    """``(model, preprocess, tokenizer)`` from a file written by :func:`save_zoo_clip` (eval mode).

    Exactly the open_clip calls a user of any open_clip model makes, after :func:`register_zoo_clip`.
    """
    import open_clip

    name = register_zoo_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path), device=device)
    tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), preprocess, tokenizer


# --------------------------------------------------------------------------------------------------
# training


@cache
def _training_captions() -> tuple[domain.Attributes, ...]:
    """Every caption of a training combination, as attributes (448 of them)."""
    held = domain.held_out_combinations()
    return tuple(
        domain.Attributes(d, f, b, t, s)
        for d, f, b in domain.all_combinations()
        if (d, f, b) not in held
        for t in domain.THICKNESSES
        for s in domain.SLANTS
    )


def _training_batch(step: int, *, seed: int, batch_size: int, hard_fraction: float) -> list[domain.Sample]:
    """``batch_size`` samples of ``train`` images with pairwise different ``train`` captions.

    A ``hard_fraction`` of the batch is whole *digit groups*: every training digit of a few
    ``(fg, bg, thickness, slant)`` settings, so in-batch negatives include captions that differ from
    the positive only in the digit, which colour cannot give away. The rest are random other training
    captions. Deterministic in ``(seed, step)``.
    """
    import random

    rng = random.Random(seed * 1_000_003 + step)
    groups: dict[tuple[str, str, str, str], list[domain.Attributes]] = {}
    for a in _training_captions():
        groups.setdefault((a.fg, a.bg, a.thickness, a.slant), []).append(a)
    keys = sorted(groups)
    rng.shuffle(keys)
    chosen: list[domain.Attributes] = []
    hard = round(hard_fraction * batch_size)
    for key in keys:
        if len(chosen) >= hard:
            break
        chosen += groups[key][: hard - len(chosen)]
    taken = set(chosen)
    rest = [a for a in _training_captions() if a not in taken]
    chosen += rng.sample(rest, batch_size - len(chosen))
    by_digit: dict[int, list[int]] = {d: [] for d in domain.DIGITS}
    for i in domain.image_split()["train"]:
        by_digit[domain.source_digit(i)].append(i)
    return [domain.Sample(index=rng.choice(by_digit[a.digit]), attributes=a) for a in chosen]


def train_zoo_clip(
    *,
    steps: int = 400,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    augment: bool = True,
    hard_fraction: float = 0.5,
    threads: int | None = 1,
    progress: bool = True,
):
    """Train ``"evomerge-digits-clip"`` contrastively from random init; returns the model (eval mode).

    ``threads``: torch CPU threads while training (restored after; ``None`` leaves the setting alone).
    ``hard_fraction``: the share of each batch in digit-only-differing groups. The caller's global
    torch RNG state is left as it was.
    """
    from optimizer.zoo.oracle import _threads

    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not 2 <= batch_size <= len(_training_captions()):
        raise ValueError(f"batch_size must be in [2, {len(_training_captions())}] (a batch holds distinct training captions)")
    if not 0 <= hard_fraction <= 1:
        raise ValueError("hard_fraction must be in [0, 1]")
    with _threads(threads), torch.random.fork_rng(devices=[]):
        return _train(steps=steps, seed=seed, batch_size=batch_size, lr=lr, augment=augment, hard_fraction=hard_fraction, progress=progress)


def _train(*, steps: int, seed: int, batch_size: int, lr: float, augment: bool, hard_fraction: float, progress: bool):
    import open_clip

    from optimizer.zoo.oracle import augment as augment_images

    name = register_zoo_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    tokenizer = open_clip.get_tokenizer(name)
    captions = [a.caption() for a in _training_captions()]
    token_ids = dict(zip(captions, tokenizer(captions), strict=True))
    generator = torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    scheduler = warmup_cosine(optimizer, steps=steps, warmup=max(1, steps // 10))
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        items = _training_batch(step, seed=seed, batch_size=batch_size, hard_fraction=hard_fraction)
        images = domain.render([s.index for s in items], [s.attributes for s in items])
        if augment:
            images = augment_images(images, generator)
        text = torch.stack([token_ids[s.caption] for s in items])
        image_features, text_features, logit_scale = model(prepare_images(model, images), text)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if progress and (step % 50 == 0 or step == steps - 1):
            print(f"clip step {step + 1}/{steps} loss={loss.item():.3f} scale={logit_scale.item():.1f} {time.perf_counter() - start:.1f}s")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# evaluation


def _swap(attributes: domain.Attributes, field: str, rng) -> domain.Attributes | None:
    """The same attributes with ``field`` changed to another valid value (``None`` if there is none)."""
    from dataclasses import replace

    from optimizer.zoo.oracle import HEADS

    choices = HEADS[field]
    options = [v for v in choices if v != getattr(attributes, field)]
    if field == "fg":
        options = [v for v in options if v != attributes.bg]
    if field == "bg":
        options = [v for v in options if v != attributes.fg]
    return replace(attributes, **{field: rng.choice(options)}) if options else None


def caption_matching(
    model,
    tokenizer,
    *,
    images: str = "test",
    captions: str = "held_out",
    count: int = 1000,
    seed: int = 0,
    perturb: bool = False,
    threads: int | None = 1,
) -> dict[str, float]:
    """Fractions of images whose true caption scores above a wrong one.

    ``"shuffled"``: another sample's (different) caption; ``"digit"``, ``"fg"``, ``"bg"``,
    ``"thickness"``, ``"slant"``: the true caption with only that word changed. ``perturb``: score
    lightly augmented renders (the training augmentations, seeded) instead of clean ones.
    """
    import random

    from optimizer.zoo.oracle import _threads

    items = domain.samples(images=images, captions=captions, count=count, seed=seed)
    rng = random.Random(seed)
    order = list(range(count))
    rng.shuffle(order)
    true_captions = [s.caption for s in items]
    wrong: dict[str, list[str | None]] = {"shuffled": list(true_captions)}
    for k, i in enumerate(order):  # each image gets the next image's caption in a random cycle
        wrong["shuffled"][i] = true_captions[order[(k + 1) % count]]
    wrong["shuffled"] = [c if c != t else None for c, t in zip(wrong["shuffled"], true_captions, strict=True)]
    for field in ("digit", "fg", "bg", "thickness", "slant"):
        wrong[field] = [a.caption() if a else None for a in (_swap(s.attributes, field, rng) for s in items)]
    was_training = model.training
    model.eval()
    try:
        with _threads(threads):
            pictures = domain.render([s.index for s in items], [s.attributes for s in items])
            if perturb:
                from optimizer.zoo.oracle import augment

                pictures = augment(pictures, torch.Generator().manual_seed(seed))
            image_features = encode_images(model, pictures)
            distinct = sorted({c for c in true_captions} | {c for v in wrong.values() for c in v if c})
            text = dict(zip(distinct, encode_captions(model, tokenizer, distinct), strict=True))
    finally:
        model.train(was_training)

    def scores(caps: list[str]) -> torch.Tensor:
        return (100 * (image_features * torch.stack([text[c] for c in caps])).sum(-1)).clamp(min=0)

    right = scores(true_captions)
    out: dict[str, float] = {}
    for field, caps in wrong.items():
        keep = torch.tensor([c is not None for c in caps])
        other = scores([c if c is not None else t for c, t in zip(caps, true_captions, strict=True)])
        out[field] = (right > other)[keep].float().mean().item()
    return out
