"""The SD1.5 UNet of the merge benchmark: its 686 LDM keys and shapes, seeded random parents, blocks.

:func:`sd15_unet_shapes` takes the shapes from diffusers' own model (renamed by evomerge's keymap)
and checks them against sd-mecha's shipped ``sd1-ldm.yaml``; :func:`parent_state_dict` builds a
parent cheaply from one random pool; :func:`evomerge_block` and :func:`mecha_block` say which
block a key belongs to in each tool's convention. Part of ``bench/``, not of the package.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from pathlib import Path

SD15_UNET_TENSORS = 686
SD15_UNET_PARAMS = 859_520_964
POOL_ELEMENTS = 32 * 2**20  # random pool per parent; each tensor is a seeded window of it


# --------------------------------------------------------------------------------------------
# model shapes


def _mecha_sd1_ldm_yaml() -> Path | None:
    spec = importlib.util.find_spec("sd_mecha")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "extensions" / "builtin" / "model_configs" / "sd1-ldm.yaml"
    return path if path.is_file() else None


def _diffusers_sd15_unet_meta():
    """diffusers SD1.5 UNet state dict (meta tensors) and config.

    ``UNet2DConditionModel()``'s default config is NOT SD1.5: its cross_attention_dim is 1280
    (872,300,484 parameters). SD1.5 is that default with cross_attention_dim=768."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(cross_attention_dim=768)
    return unet.state_dict(), dict(unet.config)


def _mecha_shapes() -> dict[str, list[int]] | None:
    import yaml

    path = _mecha_sd1_ldm_yaml()
    if path is None:
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    return {k: list(v["shape"]) for k, v in config["components"]["diffuser"].items()}


def sd15_unet_shapes() -> tuple[dict[str, list[int]], str]:
    """Ordered ``{ldm_key: shape}`` of the 686 SD1.5 UNet tensors, and where they came from.

    Source, first that works: the diffusers meta model renamed with
    ``optimizer.checkpoint.keymap.diffusers_to_ldm``; else sd-mecha's shipped ``sd1-ldm.yaml``
    (component ``diffuser``). Checked: 686 tensors, 859,520,964 parameters, the same multiset of
    shapes as the diffusers model, and (when both are available) the same keys and shapes as
    sd-mecha's table."""
    import collections

    meta_sd, unet_config = _diffusers_sd15_unet_meta()
    meta = {k: tuple(v.shape) for k, v in meta_sd.items()}
    mecha = _mecha_shapes()
    shapes: dict[str, list[int]] | None = None
    source = ""
    if importlib.util.find_spec("optimizer.checkpoint.keymap") is not None:
        try:
            from optimizer.checkpoint.keymap import diffusers_to_ldm

            ldm = diffusers_to_ldm(components={"unet": meta_sd}, architecture="sd1", unet_config=unet_config)
            shapes = {k: list(v.shape) for k, v in ldm.items()}
            source = "diffusers UNet2DConditionModel(cross_attention_dim=768) on meta, renamed by optimizer.checkpoint.keymap.diffusers_to_ldm"
            if mecha is not None:
                if shapes != mecha and {k: tuple(v) for k, v in shapes.items()} != {k: tuple(v) for k, v in mecha.items()}:
                    raise SystemExit("keymap.diffusers_to_ldm's SD1.5 UNet keys/shapes differ from sd-mecha's sd1-ldm.yaml")
                source += " (identical to sd-mecha's sd1-ldm.yaml)"
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - fall back to sd-mecha's table
            print(f"[bench] keymap.diffusers_to_ldm unusable ({type(exc).__name__}: {exc}); using sd-mecha's sd1-ldm.yaml", file=sys.stderr)
            shapes = None
    if shapes is None:
        if mecha is None:
            raise SystemExit("need optimizer.checkpoint.keymap or sd-mecha's sd1-ldm.yaml for the LDM key names: pip install sd-mecha")
        shapes = mecha
        source = "sd-mecha sd1-ldm.yaml (component 'diffuser'), cross-checked with diffusers UNet2DConditionModel(cross_attention_dim=768) on meta"
    n_params = sum(math.prod(s) for s in shapes.values())
    if len(shapes) != SD15_UNET_TENSORS or n_params != SD15_UNET_PARAMS:
        raise SystemExit(f"expected {SD15_UNET_TENSORS} tensors / {SD15_UNET_PARAMS:,} params, got {len(shapes)} / {n_params:,}")
    meta_params = sum(math.prod(s) for s in meta.values())
    if len(meta) != SD15_UNET_TENSORS or meta_params != SD15_UNET_PARAMS:
        raise SystemExit(f"diffusers SD1.5 UNet: expected {SD15_UNET_TENSORS} / {SD15_UNET_PARAMS:,}, got {len(meta)} / {meta_params:,}")
    if collections.Counter(tuple(s) for s in shapes.values()) != collections.Counter(meta.values()):
        raise SystemExit("LDM shapes differ from the diffusers SD1.5 UNet's shapes")
    return shapes, source


# --------------------------------------------------------------------------------------------
# parents: seeded random data, cheap to build in every subprocess


def random_pool(seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(POOL_ELEMENTS, generator=g, dtype=torch.float32).mul_(0.02)


def parent_state_dict(shapes: dict[str, list[int]], seed: int, pool=None) -> dict:
    """``{key: tensor}`` of fp32 N(0, 0.02^2) values: each tensor is a window, at an offset seeded
    by (seed, key), of one random pool of 32M values per parent. Views, so building a parent
    costs ~130 MB and ~1 s instead of 3.4 GB and ~20 s; timings do not depend on the values."""
    pool = random_pool(seed) if pool is None else pool
    out = {}
    for key, shape in shapes.items():
        numel = math.prod(shape)
        span = POOL_ELEMENTS - numel
        off = zlib.crc32(f"{seed}:{key}".encode()) % span if span > 0 else 0
        out[key] = pool[off : off + numel].view(*shape)
    return out


def evomerge_block(key: str) -> str:
    from optimizer.architectures import load_layout

    return load_layout("sd1").owner_of(key)


def mecha_block(key: str) -> str:
    """sd-mecha's sd1 block convention (convert_sd1_blocks_to_ldm): as evomerge's, except that
    ``time_embed`` belongs to BASE (evomerge: IN00)."""
    if ".time_embed." in key:
        return "BASE"
    return evomerge_block(key)
