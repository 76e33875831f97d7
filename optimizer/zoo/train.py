"""Training the zoo on CPU: the shared VAE, the base model, its specialists and a second initialisation.

Everything is seeded and data order is fixed: images are rendered on the fly from
``domain.samples(images="train", captions="train", ...)`` (never a held-out ``(digit, fg, bg)``
combination), noise, timesteps and latent samples come from one seeded ``torch.Generator``, and
the caption dropout (classifier-free guidance) from a seeded ``random.Random``; the same arguments
give bit-identical weights on the same machine.

* :func:`train_vae`: the ``AutoencoderKL`` (L1 + MSE reconstruction + a small KL term), then its
  ``scaling_factor`` (1 / std of training latents) is written into its config.
* :func:`train_base`: text encoder + UNet from scratch, epsilon prediction on SD1's DDPM schedule,
  on captions with web-like noise (:func:`noisy_caption`): each colour and style word is redrawn
  at random with probability ``caption_noise``, as alt-text often gets colours wrong; the digit
  is always right. Colours and style are learnt within a few hundred steps, so without that noise
  the base follows them perfectly and no specialist could do better; with it the base is a
  generalist that follows every attribute, none perfectly.
* :func:`finetune`: a specialist from a trained model. Its captions keep only the attributes of
  its speciality truthful and scramble the others (see :data:`SPECIALITIES`), so it learns to
  ignore those words: it follows its speciality better than the base on captions it never saw,
  and loses the rest.
* :func:`train_zoo`: every model of :data:`ZOO_RECIPE`, in order.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from optimizer.zoo import domain, models, tokenizer
from optimizer.zoo.schedule import warmup_cosine

__all__ = [
    "SPECIALITIES",
    "ZOO_RECIPE",
    "Recipe",
    "TrainedModel",
    "finetune",
    "noisy_caption",
    "scramble",
    "train_base",
    "train_vae",
    "train_zoo",
]

#: speciality -> the caption attributes it keeps truthful; the others are scrambled
SPECIALITIES: dict[str, tuple[str, ...]] = {
    "shape": ("digit",),
    "colour": ("fg", "bg"),
    "style": ("thickness", "slant"),
}

#: the caption attributes, in caption order
ATTRIBUTES: tuple[str, ...] = ("digit", "fg", "bg", "thickness", "slant")
#: the attributes the base's caption noise redraws (:func:`noisy_caption`)
NOISY_ATTRIBUTES: tuple[str, ...] = ("fg", "bg", "thickness", "slant")

#: probability that a training caption is replaced by ``""`` (classifier-free guidance)
CAPTION_DROPOUT = 0.1
#: the text encoder learns at this fraction of the UNet's learning rate: at the full rate it learns
#: the colour words first and drowns out digit and slant (the UNet then never learns to follow them)
TEXT_ENCODER_LR_SCALE = 0.1
#: Min-SNR loss weighting gamma (``None``: plain MSE)
SNR_GAMMA: float | None = 5.0
THREADS = 2


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is trained. ``kind``: ``"vae"``, ``"base"`` (from scratch) or ``"finetune"``."""

    name: str
    kind: str
    steps: int
    seed: int
    lr: float
    batch_size: int = 64
    parent: str | None = None  # finetune: the model it starts from
    speciality: str | None = None  # finetune: a key of SPECIALITIES
    train_text_encoder: bool = False  # finetune: also train the text encoder
    caption_noise: float = 0.0  # base: probability that each of NOISY_ATTRIBUTES is redrawn


#: The zoo, in training order. ``other_init`` is the base recipe from another random initialisation
#: (same VAE, so its latents are compatible): the negative control for merging.
ZOO_RECIPE: tuple[Recipe, ...] = (
    Recipe("vae", "vae", steps=600, seed=1, lr=2e-3),
    Recipe("base", "base", steps=1200, seed=2, lr=4e-3, caption_noise=0.25),
    Recipe("shape", "finetune", steps=400, seed=3, lr=1e-3, parent="base", speciality="shape"),
    Recipe("colour", "finetune", steps=400, seed=4, lr=1e-3, parent="base", speciality="colour"),
    Recipe("style", "finetune", steps=400, seed=5, lr=1e-3, parent="base", speciality="style"),
    Recipe("other_init", "base", steps=1200, seed=6, lr=4e-3, caption_noise=0.25),
)


@dataclass
class TrainedModel:
    """A trained zoo model: its components (``vae``; ``text_encoder`` and ``unet`` unless a VAE) and seconds taken."""

    recipe: Recipe
    components: dict[str, torch.nn.Module] = field(default_factory=dict)
    seconds: float = 0.0


def _stream(*, seed: int, steps: int, batch_size: int) -> Iterator[tuple[torch.Tensor, list[domain.Sample]]]:
    """``steps`` batches of training renders in [-1, 1] with their samples, in a fixed order."""
    items = domain.samples(images="train", captions="train", count=steps * batch_size, seed=seed)
    for images, _, chunk in domain.batches(items, batch_size=batch_size):
        yield images * 2 - 1, chunk


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up (10% of the steps, at most 50), then cosine decay to 10% of the learning rate."""
    return warmup_cosine(optimizer, steps=steps, warmup=min(50, max(1, steps // 10)), floor=0.1)


def _bar(steps: int, desc: str, progress: bool):
    return tqdm(total=steps, desc=desc, disable=not progress, unit="step", dynamic_ncols=True)


def train_vae(
    *, steps: int, seed: int, lr: float = 2e-3, batch_size: int = 64, kl_weight: float = 1e-5, progress: bool = True
):
    """Train the zoo ``AutoencoderKL`` from scratch on training renders; returns it in eval mode.

    Loss: L1 + MSE between image and reconstruction (in [-1, 1]) + ``kl_weight`` x KL. Afterwards
    ``scaling_factor`` is set to 1 / std of the latents of 1,024 training renders.
    """
    torch.set_num_threads(THREADS)
    vae = models.build_vae(seed=seed).train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = _schedule(optimizer, steps)
    with _bar(steps, "vae", progress) as bar:
        for step, (images, _) in enumerate(_stream(seed=seed, steps=steps, batch_size=batch_size)):
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample
            loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(images).latent_dist.sample(generator=generator)
                for images, _ in _stream(seed=seed + 1_000_003, steps=8, batch_size=128)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def scramble(sample: domain.Sample, *, keep: Sequence[str], rng: random.Random) -> str:
    """The caption of ``sample`` with every attribute not in ``keep`` redrawn at random.

    Redrawn ``(digit, fg, bg)`` are drawn among the training combinations only, so a scrambled
    caption never names a held-out combination.
    """
    a = sample.attributes
    held = domain.held_out_combinations()
    combos = [
        c
        for c in domain.all_combinations()
        if c not in held
        and ("digit" not in keep or c[0] == a.digit)
        and ("fg" not in keep or c[1] == a.fg)
        and ("bg" not in keep or c[2] == a.bg)
    ]
    digit, fg, bg = rng.choice(combos)
    thickness = a.thickness if "thickness" in keep else rng.choice(domain.THICKNESSES)
    slant = a.slant if "slant" in keep else rng.choice(domain.SLANTS)
    return domain.Attributes(digit=digit, fg=fg, bg=bg, thickness=thickness, slant=slant).caption()


def noisy_caption(sample: domain.Sample, *, probability: float, rng: random.Random, attributes: Sequence[str] = NOISY_ATTRIBUTES) -> str:
    """The caption of ``sample`` with each of ``attributes`` independently redrawn (by
    :func:`scramble`) with ``probability``; the others stay truthful. ``probability = 0`` draws
    nothing from ``rng`` and returns the true caption."""
    if probability <= 0.0:
        return sample.caption
    keep = [a for a in ATTRIBUTES if a not in attributes or rng.random() >= probability]
    return scramble(sample, keep=keep, rng=rng)


def _train_diffusion(
    *,
    vae,
    text_encoder,
    unet,
    steps: int,
    seed: int,
    lr: float,
    batch_size: int,
    caption: Callable[[domain.Sample, random.Random], str],
    train_text_encoder: bool,
    desc: str,
    progress: bool,
    trainable: Sequence[torch.nn.Parameter] | None = None,
) -> None:
    """Train ``unet`` (and ``text_encoder`` when asked) in place for epsilon prediction.

    ``trainable``: train only these parameters (a LoRA's factors, a hypernetwork's layers; they may
    live outside ``unet`` as long as its forward uses them), the UNet's own weights frozen.

    The per-sample MSE is weighted by ``min(SNR, SNR_GAMMA) / SNR`` (Min-SNR weighting, Hang et al.
    2023) unless :data:`SNR_GAMMA` is ``None``: low-noise steps weigh less, and shapes are learnt sooner.
    """
    from diffusers import DDPMScheduler

    torch.set_num_threads(THREADS)
    noise_schedule = DDPMScheduler(**models.NOISE_SCHEDULE)
    alphas = noise_schedule.alphas_cumprod
    tok = tokenizer.load_tokenizer()
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    vae.eval().requires_grad_(False)
    unet.train().requires_grad_(trainable is None)
    text_encoder.train(train_text_encoder).requires_grad_(train_text_encoder)
    if trainable is not None:
        for p in trainable:
            p.requires_grad_(True)
    groups = [{"params": list(unet.parameters()) if trainable is None else list(trainable), "lr": lr}]
    if train_text_encoder:
        groups.append({"params": list(text_encoder.parameters()), "lr": lr * TEXT_ENCODER_LR_SCALE})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
    schedule = _schedule(optimizer, steps)
    frozen: dict[str, torch.Tensor] = {}  # caption -> embedding, when the text encoder is frozen

    def embed(captions: list[str]) -> torch.Tensor:
        if train_text_encoder:
            return models.encode_prompts(text_encoder, tok, captions)
        missing = sorted(set(captions) - frozen.keys())
        if missing:
            with torch.no_grad():
                frozen.update(zip(missing, models.encode_prompts(text_encoder, tok, missing), strict=True))
        return torch.stack([frozen[c] for c in captions])

    with _bar(steps, desc, progress) as bar:
        for step, (images, chunk) in enumerate(_stream(seed=seed, steps=steps, batch_size=batch_size)):
            captions = ["" if rng.random() < CAPTION_DROPOUT else caption(s, rng) for s in chunk]
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample(generator=generator) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(chunk),), generator=generator)
            noisy = noise_schedule.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, embed(captions)).sample
            loss = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
            if SNR_GAMMA is not None:
                snr = alphas[timesteps] / (1 - alphas[timesteps])
                loss = loss * snr.clamp(max=SNR_GAMMA) / snr
            loss = loss.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            bar.update()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def train_base(
    *,
    vae,
    steps: int,
    seed: int,
    lr: float = 4e-3,
    batch_size: int = 64,
    caption_noise: float = 0.0,
    progress: bool = True,
    desc: str = "base",
):
    """Train a text encoder and a UNet jointly from scratch (seeded init); returns ``(text_encoder, unet)``.

    Captions get :func:`noisy_caption` noise with probability ``caption_noise``."""
    text_encoder = models.build_text_encoder(seed=seed)
    unet = models.build_unet(seed=seed + 1)
    _train_diffusion(
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        steps=steps,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        caption=lambda s, rng: noisy_caption(s, probability=caption_noise, rng=rng),
        train_text_encoder=True,
        desc=desc,
        progress=progress,
    )
    return text_encoder, unet


def finetune(
    *,
    vae,
    text_encoder,
    unet,
    speciality: str,
    steps: int,
    seed: int,
    lr: float = 5e-4,
    batch_size: int = 64,
    train_text_encoder: bool = False,
    progress: bool = True,
):
    """Fine-tune copies of ``text_encoder`` / ``unet`` into a ``speciality`` specialist; returns ``(text_encoder, unet)``.

    Captions keep the attributes :data:`SPECIALITIES` lists for ``speciality`` and scramble the rest.
    The given modules are not modified.
    """
    if speciality not in SPECIALITIES:
        raise ValueError(f"unknown speciality {speciality!r}; known: {', '.join(SPECIALITIES)}")
    keep = SPECIALITIES[speciality]
    text_encoder, unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)
    _train_diffusion(
        vae=vae,
        text_encoder=text_encoder,
        unet=unet,
        steps=steps,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        caption=lambda s, rng: scramble(s, keep=keep, rng=rng),
        train_text_encoder=train_text_encoder,
        desc=speciality,
        progress=progress,
    )
    return text_encoder, unet


def train_zoo(recipe: Sequence[Recipe] = ZOO_RECIPE, *, progress: bool = True, scale: float = 1.0) -> dict[str, TrainedModel]:
    """Train every model of ``recipe`` in order; ``{name: TrainedModel}``.

    The first ``"vae"`` recipe gives the VAE every model shares. ``scale`` multiplies every step
    count (for quick trials).
    """
    out: dict[str, TrainedModel] = {}
    vae = None
    for r in recipe:
        r = replace(r, steps=max(1, round(r.steps * scale)))
        start = time.perf_counter()
        if r.kind == "vae":
            vae = train_vae(steps=r.steps, seed=r.seed, lr=r.lr, batch_size=r.batch_size, progress=progress)
            components = {"vae": vae}
        elif vae is None:
            raise ValueError(f"{r.name}: the recipe trains no VAE before it")
        elif r.kind == "base":
            te, unet = train_base(
                vae=vae,
                steps=r.steps,
                seed=r.seed,
                lr=r.lr,
                batch_size=r.batch_size,
                caption_noise=r.caption_noise,
                progress=progress,
                desc=r.name,
            )
            components = {"vae": vae, "text_encoder": te, "unet": unet}
        elif r.kind == "finetune":
            if r.parent not in out or r.speciality is None:
                raise ValueError(f"{r.name}: parent {r.parent!r} must be trained earlier and a speciality given")
            parent = out[r.parent].components
            te, unet = finetune(
                vae=vae,
                text_encoder=parent["text_encoder"],
                unet=parent["unet"],
                speciality=r.speciality,
                steps=r.steps,
                seed=r.seed,
                lr=r.lr,
                batch_size=r.batch_size,
                train_text_encoder=r.train_text_encoder,
                progress=progress,
            )
            components = {"vae": vae, "text_encoder": te, "unet": unet}
        else:
            raise ValueError(f"{r.name}: unknown kind {r.kind!r}")
        out[r.name] = TrainedModel(recipe=r, components=components, seconds=time.perf_counter() - start)
    return out
