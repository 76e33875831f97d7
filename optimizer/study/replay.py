"""Replaying an exported recipe document into merged weights, with no study folder.

``evomerge replay RECIPE.yaml -o OUT`` gives the bytes ``evomerge export --format safetensors`` gave
for the same trial: the parents (found where the document says, or by file name in ``--parents``;
each sha256 checked), the merge with the recorded seed, the recipe's LoRAs at their strengths (each
file's sha256 checked) and, for a study that recalibrated its norms, the study's own recalibration
(the document carries the study file for that: the norms depend on its prompts and renderer).
Hypernetworks are not weights of a checkpoint: their strengths stay in the recipe and the file's
metadata. An output ensemble is not a merge and has no weights to replay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optimizer.study.export import ExportError, replay_recipe

__all__ = ["located_parents", "replay_to_file"]


def _located(entries: list[dict[str, Any]], *, directory: Path | None, what: str) -> list[str]:
    """Each entry's file: where the document says, or ``directory / name`` when ``directory`` is given."""
    out = []
    for i, entry in enumerate(entries):
        path = Path(entry["path"])
        if directory is not None:
            path = directory / path.name
        if not path.exists():
            hint = "" if directory is not None else "; give --parents DIR, a folder holding a file of that name"
            raise ExportError(f"{what} {i}: {path} (sha256 {entry['sha256'][:12]}…) is missing{hint}")
        out.append(str(path))
    return out


def located_parents(doc: dict[str, Any], *, directory: str | os.PathLike[str] | None = None) -> list[str]:
    """The recipe's parent files: where it says, or by file name in ``directory``; one clear error for a missing one."""
    return _located(doc["parents"], directory=None if directory is None else Path(directory), what="parent")


def _checked_adapters(entries: list[dict[str, Any]], *, directory: Path | None, kind: str) -> list[tuple[str, str]]:
    from optimizer.checkpoint.hashing import sha256_file

    specs = []
    for entry, path in zip(entries, _located(entries, directory=directory, what=kind), strict=True):
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ExportError(f"{kind} {entry['name']} ({path}) has sha256 {digest[:12]}…, the recipe was made with {entry['sha256'][:12]}…")
        specs.append((entry["name"], path))
    return specs


def replay_to_file(
    doc: dict[str, Any],
    *,
    output: str | os.PathLike[str],
    output_format: str = "safetensors",
    parents_dir: str | os.PathLike[str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the merged weights of recipe document ``doc`` (see the module docstring); every input
    is found and checked before anything is written."""
    from optimizer.merge_files import check_merged_output, merge_to_file, write_merged

    if output_format not in ("safetensors", "bare", "diffusers"):
        raise ExportError(f"replay writes safetensors, bare or diffusers, not {output_format!r}")
    from optimizer.study.techniques import TechniqueError, technique_class

    try:
        technique = technique_class(doc.get("technique", "merge"))
    except TechniqueError as exc:
        raise ExportError(f"the recipe's technique: {exc}") from None
    refusal = technique.export_refusal(output_format)
    if refusal is not None:
        raise ExportError(refusal)
    directory = None if parents_dir is None else Path(parents_dir)
    if config_dir is None and doc.get("config_dir") and Path(doc["config_dir"]).is_dir():
        config_dir = doc["config_dir"]  # the study's own render configs, where they still are
    if directory is not None and not directory.is_dir():
        raise ExportError(f"--parents {directory}: no such folder")
    output = check_merged_output(output, output_format=output_format, overwrite=overwrite)
    paths = _located(doc["parents"], directory=directory, what="parent")
    loras = _checked_adapters(doc.get("loras", []), directory=directory, kind="LoRA")
    if doc.get("recalibrate") is not None and "study_file" not in doc:
        raise ExportError("the recipe recalibrates norms but carries no study file (exported before evomerge stored it): export it again from its study")
    parents, recipe = replay_recipe(doc, parent_paths=paths, device=device)
    if recipe.loras and not loras:
        raise ExportError(f"the recipe sets LoRA strengths {sorted(recipe.loras)} but lists no LoRA files")
    if doc.get("recalibrate") is not None:
        from optimizer.study.config import parse_study_config
        from optimizer.study.techniques import study_parents

        study_file = {**doc["study_file"], "parents": paths}
        if config_dir is not None:
            study_file["config_dir"] = str(config_dir)
        config = parse_study_config(study_file, source=f"the study file in {doc.get('study')!r}'s recipe")
        by_name = dict(loras)
        config = config.model_copy(update={"loras": [lora.model_copy(update={"path": by_name.get(lora.resolved_name, lora.path)})
                                                     for lora in config.loras]})
        study_loaded = study_parents(config)  # as the study loaded them: the recalibrated norms depend on the dtype
        state = technique.export_state(config=config, parents=study_loaded, recipe=recipe)
        render_dir = _render_dir(study_loaded, config_dir=config.config_dir, output_format=output_format)
        return write_merged(state_dict=state, parents=study_loaded, recipe=recipe, output=output, output_format=output_format,
                            config_dir=render_dir, overwrite=overwrite, dtype=doc.get("output_dtype"))
    adapters = []
    if loras:
        from optimizer.adapters.lora import load_loras
        from optimizer.study.pipeline import unet_config

        adapters = load_loras(loras, bank=parents.bank, unet_config=unet_config(parents, config_dir=config_dir))
    return merge_to_file(parents=parents, recipe=recipe, output=output, output_format=output_format, overwrite=overwrite,
                         config_dir=_render_dir(parents, config_dir=config_dir, output_format=output_format), loras=adapters,
                         dtype=doc.get("output_dtype"))


def _render_dir(parents, *, config_dir, output_format: str):
    if output_format != "diffusers":
        return None
    from optimizer.study.pipeline import render_config_dir

    return render_config_dir(parents, config_dir=config_dir)
