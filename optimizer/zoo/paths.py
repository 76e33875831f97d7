"""Where the committed zoo lives and how its files are named.

Layout of a zoo folder (``studies/zoo`` in the repository)::

    manifest.json                 sha256 of every file, training configs, timings, quality figures
    README.md                     the quality table (generated)
    config/                       offline diffusers config folder shared by every model
                                  (model_index.json, scheduler, unet/vae/text_encoder configs, tokenizer)
    models/<name>.safetensors     LDM / A1111 single-file checkpoint (fp16)
    diffusers/<name>/             the same pipeline as a diffusers folder (fp16; built, not committed)
    scorers/clip.safetensors      the zoo's tiny open_clip model
    scorers/oracle/               the attribute classifier (evaluation only)
    grids/<name>.png              images of held-out captions, for people to look at
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST = "manifest.json"


def default_zoo_dir() -> Path:
    """``$EVOMERGE_ZOO`` or ``studies/zoo`` of the checkout this package runs from."""
    env = os.environ.get("EVOMERGE_ZOO")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "studies" / "zoo"


def model_file(zoo: Path, name: str) -> Path:
    return zoo / "models" / f"{name}.safetensors"


def diffusers_dir(zoo: Path, name: str) -> Path:
    return zoo / "diffusers" / name


def config_dir(zoo: Path) -> Path:
    return zoo / "config"


def clip_file(zoo: Path) -> Path:
    return zoo / "scorers" / "clip.safetensors"


def oracle_dir(zoo: Path) -> Path:
    return zoo / "scorers" / "oracle"


def grid_file(zoo: Path, name: str) -> Path:
    return zoo / "grids" / f"{name}.png"

