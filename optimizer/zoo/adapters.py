"""The zoo's trained adapters: a LoRA and a hypernetwork on the base model, for real-weight tests.

``evomerge zoo adapters`` trains them from the committed ``models/base.safetensors`` with the same
seeded data stream as the zoo models (:mod:`optimizer.zoo.train`) and writes, atomically:

* ``adapters/lora-colour.safetensors``: a rank-4 LoRA (PEFT, via ``peft`` and diffusers'
  ``save_lora_weights``: keys ``unet.<module>.lora_A.weight``) on every attention projection of the
  UNet, trained on captions whose colours are truthful and whose other attributes are scrambled
  (the ``colour`` speciality): it should raise colour accuracy and cost digit accuracy, so its
  strength is a real trade-off to search;
* ``adapters/hyper-clean.pt``: an A1111 hypernetwork (context dims 64 and 32, layer structure
  1-2-1) trained on fully truthful captions (the base saw 25% noisy colour/style words);
* ``adapters/adapters.json``: recipes, sha256 of both files, versions and the oracle figures of the
  base with each adapter at a few strengths (held-out captions, as in the zoo README).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from optimizer.atomic import write_atomic, write_text_atomic
from optimizer.checkpoint.hashing import sha256_file
from optimizer.zoo import paths, train

__all__ = ["ADAPTERS", "AdapterRecipe", "adapter_file", "train_adapters", "train_lora"]


@dataclass(frozen=True)
class AdapterRecipe:
    """How one zoo adapter is trained on the base. ``speciality``: a key of
    :data:`optimizer.zoo.train.SPECIALITIES`, or ``None`` for fully truthful captions."""

    name: str
    kind: str  # "lora" or "hypernetwork"
    steps: int
    seed: int
    lr: float
    speciality: str | None
    rank: int = 4  # lora
    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)  # hypernetwork
    batch_size: int = 64


ADAPTERS: tuple[AdapterRecipe, ...] = (
    AdapterRecipe("lora-colour", "lora", steps=400, seed=11, lr=5e-3, speciality="colour"),
    AdapterRecipe("hyper-clean", "hypernetwork", steps=400, seed=12, lr=2e-3, speciality=None),
)
SUFFIX = {"lora": ".safetensors", "hypernetwork": ".pt"}
#: strengths at which each adapter's effect is measured for the manifest
MEASURED_STRENGTHS = (0.25, 0.5, 1.0)


def adapter_file(zoo: Path, name: str) -> Path:
    """``<zoo>/adapters/<name>.safetensors`` (LoRA) or ``.pt`` (hypernetwork)."""
    recipe = next((r for r in ADAPTERS if r.name == name), None)
    if recipe is None:
        raise KeyError(f"no zoo adapter {name!r}; known: {', '.join(r.name for r in ADAPTERS)}")
    return zoo / "adapters" / f"{name}{SUFFIX[recipe.kind]}"


def _caption(speciality: str | None):
    if speciality is None:
        return lambda sample, rng: sample.caption
    keep = train.SPECIALITIES[speciality]
    return lambda sample, rng: train.scramble(sample, keep=keep, rng=rng)


def train_lora(*, vae, text_encoder, unet, recipe: AdapterRecipe, progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train a LoRA (``lora_alpha = rank``) on a copy of ``unet``; its PEFT state dict (``lora_A``/``lora_B``)
    and its PEFT config (for the file's metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(recipe.seed)  # PEFT draws the initial down factors from the global generator
    unet.add_adapter(
        LoraConfig(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    trainable = [p for n, p in unet.named_parameters() if "lora_" in n]
    train._train_diffusion(
        vae=vae, text_encoder=text_encoder, unet=unet, steps=recipe.steps, seed=recipe.seed, lr=recipe.lr,
        batch_size=recipe.batch_size, caption=_caption(recipe.speciality), train_text_encoder=False,
        desc=recipe.name, progress=progress, trainable=trainable,
    )
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return state, unet.peft_config["default"].to_dict()


def _save_lora(state: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, Any]) -> None:
    """Write ``state`` with diffusers' ``save_lora_weights`` (keys ``unet.<module>.lora_A.weight``), atomically."""
    from diffusers import StableDiffusionPipeline

    def save(tmp: str) -> None:
        StableDiffusionPipeline.save_lora_weights(
            os.path.dirname(tmp), unet_lora_layers=state, weight_name=os.path.basename(tmp), safe_serialization=True,
            unet_lora_adapter_metadata=metadata,
        )

    write_atomic(path, save)


def train_hypernetwork(*, vae, text_encoder, unet, recipe: AdapterRecipe, progress: bool = True):
    """Train an A1111 hypernetwork (context dims of the UNet's attentions) with ``unet`` frozen."""
    from optimizer.adapters.hypernetwork import Hypernetwork, HypernetworkStack, install_hypernetworks, remove_hypernetworks

    dims = sorted({unet.config.cross_attention_dim, *unet.config.block_out_channels})
    hypernetwork = Hypernetwork.new(dims=dims, layer_structure=recipe.layer_structure, name=recipe.name, seed=recipe.seed)
    stack = HypernetworkStack([hypernetwork])
    install_hypernetworks(unet, stack)
    try:
        stack.train()
        train._train_diffusion(
            vae=vae, text_encoder=text_encoder, unet=unet, steps=recipe.steps, seed=recipe.seed, lr=recipe.lr,
            batch_size=recipe.batch_size, caption=_caption(recipe.speciality), train_text_encoder=False,
            desc=recipe.name, progress=progress, trainable=list(hypernetwork.parameters()),
        )
    finally:
        remove_hypernetworks(unet)
    hypernetwork.eval().requires_grad_(False)
    return hypernetwork


def measure_adapters(zoo: Path, *, strengths: tuple[float, ...] = MEASURED_STRENGTHS, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Oracle and CLIP figures of the base alone and with each adapter at ``strengths``, through
    evomerge's own loaders and study runner, on the zoo README's held-out evaluation set."""
    from optimizer.zoo.build import EVALUATION
    from optimizer.zoo.candidates import Candidate, CandidateEvaluator

    evaluator = CandidateEvaluator(zoo=zoo, count=EVALUATION["count"], steps=EVALUATION["steps"], guidance=EVALUATION["guidance"], seed=EVALUATION["seed"])
    keys = ("oracle_digit", "oracle_fg", "oracle_bg", "oracle_thickness", "oracle_slant", "oracle_all", "clip_score")

    def score(candidate: Candidate) -> dict[str, float]:
        row = evaluator.evaluate(candidate)
        result = {k: round(float(row[k]), 4) for k in keys}
        if progress:
            print(f"  {candidate.label}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
        return result

    figures: dict[str, dict[str, Any]] = {"base": {"0": score(Candidate("base", ("base",)))}}
    for recipe in ADAPTERS:
        path = str(adapter_file(zoo, recipe.name))
        figures[recipe.name] = {}
        for s in strengths:
            if recipe.kind == "lora":
                candidate = Candidate(f"{recipe.name} x{s}", ("base",), loras=((path, s),))
            else:
                candidate = Candidate(f"{recipe.name} x{s}", ("base",), hypernetworks=((path, s),))
            figures[recipe.name][str(s)] = score(candidate)
    return figures


def train_adapters(*, zoo: Path | None = None, scale: float = 1.0, measure: bool = True, progress: bool = True) -> dict[str, Any]:
    """Train every adapter of :data:`ADAPTERS` on the zoo's base, write the files and ``adapters.json``."""
    from optimizer.adapters.hypernetwork import save_hypernetwork
    from optimizer.zoo.build import _versions, load_zoo_pipeline

    zoo = zoo or paths.default_zoo_dir()
    torch.set_num_threads(train.THREADS)
    pipe = load_zoo_pipeline("base", zoo=zoo)
    entries = []
    for recipe in ADAPTERS:
        recipe = AdapterRecipe(**{**asdict(recipe), "steps": max(1, round(recipe.steps * scale))})
        started = time.perf_counter()
        path = adapter_file(zoo, recipe.name)
        if recipe.kind == "lora":
            state, config = train_lora(vae=pipe.vae, text_encoder=pipe.text_encoder, unet=pipe.unet, recipe=recipe, progress=progress)
            _save_lora(state, path, metadata=config)
        else:
            hypernetwork = train_hypernetwork(vae=pipe.vae, text_encoder=pipe.text_encoder, unet=pipe.unet, recipe=recipe, progress=progress)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_hypernetwork(hypernetwork, path)
        entry = {**asdict(recipe), "file": path.relative_to(zoo).as_posix(), "sha256": sha256_file(path, use_cache=False), "seconds": round(time.perf_counter() - started, 1)}
        entries.append(entry)
    manifest: dict[str, Any] = {"format": 1, "built_by": "evomerge zoo adapters", "scale": scale, "versions": _versions(), "adapters": entries}
    if measure:
        manifest["figures"] = measure_adapters(zoo, progress=progress)
    text = json.dumps(manifest, indent=2) + "\n"
    write_text_atomic(zoo / "adapters" / "adapters.json", text)
    return json.loads(text)


if __name__ == "__main__":  # pragma: no cover - `evomerge zoo adapters` is the entry point
    train_adapters()
