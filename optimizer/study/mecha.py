"""Exporting a recipe as an sd-mecha recipe (``.mecha``), for sd-mecha and comfy-mecha users.

The exported graph merges the same parents with sd-mecha's own method of the same formula, and
gives every key of sd-mecha's model config the parameter evomerge used for it: a per-key literal
(``literal &N model_config="sd1-ldm" merge_space="param"``), not sd-mecha's block literal, because
sd-mecha's block convention differs from the A1111 one evomerge uses (it puts ``time_embed`` in
BASE, evomerge in IN00), and a block literal would merge those keys differently. Keys the recipe
leaves to the first parent (VAE without ``merge_vae``, position ids, the noise-schedule buffers)
get 0, which every exported method maps to the first parent.

Exported exactly (tested by merging the file with sd-mecha and comparing tensors):
``weighted_sum`` (two parents: ``lerp``), ``add_difference`` (``A + alpha (B - C)``),
``add_difference_clamped`` (sd-mecha's ``clamp_to_ab``) and ``n_average`` (with ``merge_vae``:
sd-mecha averages every key). Other methods have no
sd-mecha method of the same formula (TIES' trim count, DARE's and DELLA's random masks, SLERP's
norm interpolation differ) and are refused, as are recipes with LoRAs. The graph is built and
written with sd-mecha's own API (``sd_mecha.serialize``), so sd-mecha must be installed
(``pip install 'evomerge[mecha]'``).
"""

from __future__ import annotations

from collections.abc import Sequence

from optimizer.architectures.layout import BlockLayout
from optimizer.merge import NON_MERGEABLE_PATTERNS, VAE_PARAMS_BLOCK, MergeRecipe
from optimizer.study.export import ExportError

__all__ = ["MODEL_CONFIGS", "mecha_text"]

#: evomerge architecture -> sd-mecha model config of its single-file (LDM / SGM) keys
MODEL_CONFIGS = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm", "sd3": "sd3-comfyui", "flux": "flux-flux"}  # SD3.5 Large: no sd-mecha config
EXPORTED = ("weighted_sum", "add_difference", "add_difference_clamped", "n_average")


def _value(layout: BlockLayout, recipe: MergeRecipe, param: str, key: str) -> float:
    """The parameter evomerge merged ``key`` with; 0 (the first parent) where the recipe copies it."""
    if any(pattern.search(key) for pattern in NON_MERGEABLE_PATTERNS):
        return 0.0
    try:
        owner = layout.owner_of(key)
    except Exception:  # noqa: BLE001 - a key evomerge's layout does not know (sd-mecha's extra buffers): the first parent's
        return 0.0
    if owner in layout.components:
        return float(recipe.params[param][VAE_PARAMS_BLOCK]) if recipe.merge_vae else 0.0
    return float(recipe.params[param][owner]) if owner in recipe.params[param] else 0.0


def mecha_text(*, recipe: MergeRecipe, layout: BlockLayout, parent_paths: Sequence[str]) -> str:
    """The ``.mecha`` text of ``recipe`` on these parents (see the module docstring)."""
    if recipe.method not in EXPORTED:
        raise ExportError(f"--format mecha: {recipe.method} has no sd-mecha method of the same formula; exported exactly: {', '.join(EXPORTED)}")
    if recipe.loras:
        raise ExportError("--format mecha: the recipe sets LoRA strengths, which an sd-mecha recipe cannot express")
    config = MODEL_CONFIGS.get(layout.name)
    if config is None:
        raise ExportError(f"--format mecha: no sd-mecha model config for {layout.name} single files; exported: {', '.join(MODEL_CONFIGS)}")
    if recipe.method == "weighted_sum" and len(parent_paths) != 2:
        raise ExportError("--format mecha: a weighted sum of more than two parents has no sd-mecha method")
    if recipe.method == "n_average" and not recipe.merge_vae:
        raise ExportError("--format mecha: sd-mecha's n_average averages the VAE too; export an n_average recipe with merge_vae")
    try:
        import sd_mecha
        from sd_mecha.extensions import model_configs
    except ImportError:
        raise ExportError("--format mecha needs sd-mecha: pip install 'evomerge[mecha]'") from None
    keys = [k for k, meta in model_configs.resolve(config).keys().items() if not meta.optional]
    _check_parent_keys(parent_paths, keys=keys, config=config)

    def literal(param: str):
        return sd_mecha.literal({k: _value(layout, recipe, param, k) for k in keys}, config)

    try:
        models = [sd_mecha.model(str(p), config) for p in parent_paths]
        if recipe.method == "weighted_sum":
            node = sd_mecha.weighted_sum(models[0], models[1], alpha=literal("alpha"))
        elif recipe.method == "n_average":
            node = sd_mecha.n_average(*models)
        else:
            node = sd_mecha.add_difference(models[0], models[1], models[2], alpha=literal("alpha"),
                                           clamp_to_ab=recipe.method == "add_difference_clamped")
        return sd_mecha.serialize(node)
    except Exception as exc:  # noqa: BLE001 - sd-mecha raises many types; one line names it
        raise ExportError(f"--format mecha: sd-mecha refused the recipe: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def _check_parent_keys(paths: Sequence[str], *, keys: Sequence[str], config: str) -> None:
    """sd-mecha refuses a model that lacks keys of its config: say so now, for the parents whose
    safetensors header can be read here (a moved parent is not checked)."""
    from pathlib import Path

    from safetensors import safe_open

    for i, path in enumerate(paths):
        if not (Path(path).is_file() and Path(path).suffix == ".safetensors"):
            continue
        with safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
        lacking = [k for k in keys if k not in present and not k.endswith("position_ids")]
        if lacking:
            raise ExportError(f"--format mecha: parent {i} ({path}) lacks {len(lacking)} keys of sd-mecha's {config} config "
                              f"(e.g. {lacking[0]}): sd-mecha could not merge it")
