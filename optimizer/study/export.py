"""Exporting a trial: recipe YAML (replayable), A1111 MBW string, sd-mecha recipe, ComfyUI workflow, merged safetensors, diffusers folder.

The recipe document (``format: recipe``) is what replays a trial bit for bit::

    evomerge_recipe: 1
    study: zoo-shape-colour
    trial: 41
    values: {clip: 71.2}
    architecture: sd1
    parents:                                   # in merge order, with their full sha256
      - {path: /abs/shape.safetensors, sha256: 9f2c...}
    recipe: {method: weighted_sum, params: {alpha: {BASE: 0.1, ...}}, seed: 0, merge_vae: false}
    mbw: {alpha: "0.1,0.93,..."}

:func:`replay_recipe` loads the parents named there (refusing any whose sha256 differs: a
different file would not give the trial's weights) and merges the recipe with the same kernel, so
the result equals the weights the trial rendered with.

Which trial: ``best`` (single objective), a trial number, or for a Pareto study ``best`` means the
Pareto trial with the best weighted score on the **held-out** prompts (rendered here, recorded in
the study's user attribute ``held_out``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import optuna
import yaml

from optimizer.atomic import write_text_atomic
from optimizer.errors import EvomergeError
from optimizer.merge import MergeRecipe
from optimizer.merge_files import LoadedParents, load_parents, merge_to_file, write_merged
from optimizer.study.config import StudyConfig

__all__ = ["FORMATS", "PROVENANCE_ATTR", "ExportError", "export_trial", "pick_trial", "provenance", "recipe_document", "relocated",
           "replay_recipe", "stored_provenance"]

FORMATS = ("recipe", "mbw", "mecha", "comfyui", "safetensors", "bare", "diffusers")
#: formats written from what the study stores, without the parents' weights
WEIGHTLESS_FORMATS = ("recipe", "mbw", "mecha", "comfyui")  # mecha reads the parents' key lists, not their weights
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
HELD_OUT_ATTR = "held_out"
#: study attribute: the parents' and adapters' files (path, sha256) and the bank dtype, stored at creation,
#: so a study folder copied elsewhere exports its recipe and MBW string without the weights
PROVENANCE_ATTR = "provenance"


class ExportError(EvomergeError, ValueError):
    """The trial cannot be exported (no such trial, not complete, parents changed, ...)."""


def pick_trial(study: optuna.Study, which: str = "best", *, runner=None) -> optuna.trial.FrozenTrial:
    """The trial to export (see the module docstring); ``runner`` renders held-out prompts for Pareto studies."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if which != "best":
        try:
            number = int(which)
        except ValueError:
            raise ExportError(f"--trial takes 'best' or a trial number, got {which!r}") from None
        found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not found:
            raise ExportError(f"study {study.study_name!r} has no trial {number}")
        if found[0].state != optuna.trial.TrialState.COMPLETE:
            raise ExportError(f"trial {number} is {found[0].state.name}, not COMPLETE")
        return found[0]
    if not complete:
        raise ExportError(f"study {study.study_name!r} has no complete trial yet")
    if len(study.directions) == 1:
        return study.best_trial
    pareto = study.best_trials
    if runner is None:
        raise ExportError("a Pareto study's best trial is chosen on held-out prompts: a runner is needed to render them")
    held = dict(study.user_attrs.get(HELD_OUT_ATTR, {}))
    for trial in pareto:
        if str(trial.number) not in held:
            recipe = MergeRecipe.model_validate(trial.user_attrs["recipe"])
            held[str(trial.number)] = runner.evaluate(recipe, split="held_out")
            study.set_user_attr(HELD_OUT_ATTR, held)
    return max(pareto, key=lambda t: held[str(t.number)]["score"])


def _adapter_entries(items: list[Any]) -> list[dict[str, str]]:
    from optimizer.checkpoint.hashing import sha256_file

    return [{"name": item.resolved_name, "path": str(item.path), "sha256": sha256_file(item.path)} for item in items]


def provenance(*, parents: LoadedParents, config: StudyConfig | None = None) -> dict[str, Any]:
    """What a recipe document says about its inputs: architecture, bank dtype, the parents' and
    (with ``config``) the LoRA and hypernetwork files, each with its sha256."""
    out: dict[str, Any] = {
        "architecture": parents.bank.layout.name,
        "dtype": str(parents.bank.dtype).removeprefix("torch."),
        "stored_dtype": parents.stored_dtype,
        "parents": [{"path": str(c.path), "sha256": c.sha256} for c in parents.checkpoints],
    }
    if config is not None and config.loras:
        out["loras"] = _adapter_entries(config.loras)
    if config is not None and config.hypernetworks:
        out["hypernetworks"] = _adapter_entries(config.hypernetworks)
    return out


def output_dtype(known: dict[str, Any], config: StudyConfig | None) -> str:
    """The dtype exported weights are written in: the study file's ``dtype`` when it names one (the
    bank's), else the parents' stored dtype (a CPU study computes fp16 parents in fp32 and writes
    fp16, as ``evomerge merge`` does); the bank's for studies made before the stored dtype was kept."""
    if config is not None and config.dtype is not None:
        return known["dtype"]
    return known.get("stored_dtype") or known["dtype"]


def stored_provenance(study: optuna.Study) -> dict[str, Any] | None:
    """The provenance the study stored at creation (``None`` for studies made before it was stored)."""
    value = study.user_attrs.get(PROVENANCE_ATTR)
    return dict(value) if isinstance(value, dict) else None


def recipe_document(
    *, study: optuna.Study, trial: optuna.trial.FrozenTrial, parents: LoadedParents | None = None, config: StudyConfig | None = None
) -> dict[str, Any]:
    """The replayable recipe document of ``trial`` (see the module docstring); with ``config``, also
    the technique, the LoRA and hypernetwork files (sha256) and the recalibration settings. Without
    ``parents``, the provenance the study stored at creation is used (no weights are read)."""
    from optimizer.architectures.layout import load_layout

    recipe = MergeRecipe.model_validate(trial.user_attrs["recipe"])
    if parents is not None:
        known = provenance(parents=parents, config=config)
    else:
        known = stored_provenance(study)
        if known is None:
            raise ExportError(f"study {study.study_name!r} was made before evomerge stored its parents' hashes: the parents are needed")
    layout = load_layout(known["architecture"])
    doc: dict[str, Any] = {
        "evomerge_recipe": 1,
        "study": study.study_name,
        "trial": trial.number,
        "values": trial.user_attrs.get("values", {}),
        "architecture": layout.name,
        "dtype": known["dtype"],
        "output_dtype": output_dtype(known, config),
        "parents": known["parents"],
        "recipe": recipe.model_dump(mode="json"),
        "mbw": {p: recipe.to_mbw(layout=layout, param=p) for p in recipe.params},
    }
    if config is not None:
        doc["technique"] = config.technique
        for kind in ("loras", "hypernetworks"):
            if known.get(kind):
                doc[kind] = known[kind]
        if config.config_dir is not None:
            doc["config_dir"] = str(config.config_dir)
        if config.recalibrate is not None:
            doc["recalibrate"] = config.recalibrate.model_dump(mode="json")
            doc["study_file"] = config.model_dump(mode="json")  # the recalibrated norms depend on its prompts and renderer
    held = study.user_attrs.get(HELD_OUT_ATTR, {}).get(str(trial.number))
    if held is not None:
        doc["held_out"] = held
    return doc


def load_recipe_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"no recipe file at {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ExportError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("evomerge_recipe") != 1 or "recipe" not in doc or "parents" not in doc:
        raise ExportError(f"{path}: not an evomerge recipe document (evomerge_recipe: 1, parents, recipe)")
    return doc


def replay_recipe(doc: dict[str, Any], *, parent_paths: list[str] | None = None, device: str = "auto", dtype: str | None = None):
    """``(LoadedParents, MergeRecipe)`` of a recipe document, the parents checked by sha256."""
    listed = doc["parents"]
    paths = parent_paths or [p["path"] for p in listed]
    if len(paths) != len(listed):
        raise ExportError(f"the recipe has {len(listed)} parents, {len(paths)} paths were given")
    parents = load_parents(paths=paths, device=device, dtype=dtype or _DTYPES.get(doc.get("dtype", "")))
    check_hashes(listed, parents, made="the recipe was made with")
    try:
        recipe = MergeRecipe.model_validate(doc["recipe"])
    except ValueError as exc:
        raise ExportError(f"the recipe is invalid: {exc}") from None
    return parents, recipe


def check_hashes(listed: list[dict[str, Any]], parents: LoadedParents, *, made: str) -> None:
    """:class:`ExportError` for the first loaded parent whose sha256 is not the one ``listed`` records."""
    for i, (want, got) in enumerate(zip(listed, parents.checkpoints, strict=True)):
        if want["sha256"] != got.sha256:
            raise ExportError(f"parent {i} ({got.path}) has sha256 {got.sha256[:12]}…, {made} {want['sha256'][:12]}…")


def _require_parents(config: StudyConfig, stored: dict[str, Any] | None, *, why: str) -> None:
    """:class:`ExportError` naming the first parent of ``config`` that is not on disk (with its stored sha256)."""
    for i, path in enumerate(config.parents):
        if not Path(path).exists():
            known = f" (sha256 {stored['parents'][i]['sha256'][:12]}…)" if stored is not None else ""
            raise ExportError(f"parent {i}: {path}{known} is missing{why}; give --parents DIR, a folder holding a file of that name")


def export_trial(
    *,
    study: optuna.Study,
    config: StudyConfig,
    trial: optuna.trial.FrozenTrial,
    output_format: str,
    output: str | os.PathLike[str],
    parents: LoadedParents | None = None,
    overwrite: bool = False,
    runner: Any = None,
) -> Path:
    """Write ``trial`` as ``output_format`` to ``output`` (atomically) and return the path.

    Merged weights include the trial's LoRAs and, for a study that recalibrates, the recalibrated
    norms (the study's steps replayed through ``runner``'s technique, or one built here on ``parents``). Hypernetworks are not weights of
    the checkpoint: their strengths are in the recipe (and the safetensors metadata); apply them
    with the files named in the recipe document. An output ensemble is refused (not one checkpoint)."""
    if output_format not in FORMATS:
        raise ExportError(f"unknown format {output_format!r}; use {', '.join(FORMATS)}")
    from optimizer.study.techniques import technique_class

    technique = technique_class(config.technique)
    refusal = technique.export_refusal(output_format)
    if refusal is not None:
        raise ExportError(refusal)
    from optimizer.merge_files import check_merged_output

    output = check_merged_output(output, output_format=output_format, overwrite=overwrite)
    if "recipe" not in trial.user_attrs:
        raise ExportError(f"trial {trial.number} has no recorded recipe")
    stored = stored_provenance(study)
    if parents is None and output_format in WEIGHTLESS_FORMATS and stored is not None:
        doc = recipe_document(study=study, trial=trial, config=config)  # from the study alone: no weights read
    else:
        if parents is None:
            from optimizer.study.techniques import study_parents

            _require_parents(config, stored, why="")
            parents = study_parents(config)
        if stored is not None:
            check_hashes(stored["parents"], parents, made="the study was run with")
        doc = recipe_document(study=study, trial=trial, parents=parents, config=config)
        for i, (path, listed) in enumerate(zip(config.parents, doc["parents"], strict=True)):
            if Path(path).resolve() != Path(listed["path"]).resolve():
                raise ExportError(f"parent {i}: the study file names {path}, loaded {listed['path']}")
    if output_format == "recipe":
        return write_text_atomic(output, yaml.safe_dump(doc, sort_keys=False))
    if output_format == "mecha":
        from optimizer.architectures.layout import load_layout
        from optimizer.study.mecha import mecha_text

        _require_parents(config, stored, why=" (sd-mecha opens the parents it names)")  # where they are now (--parents DIR relocates them)
        text = mecha_text(recipe=MergeRecipe.model_validate(doc["recipe"]), layout=load_layout(doc["architecture"]),
                          parent_paths=[str(p) for p in config.parents])
        return write_text_atomic(output, text)
    if output_format == "comfyui":
        from optimizer.architectures.layout import load_layout
        from optimizer.study.comfyui import comfyui_text

        text = comfyui_text(recipe=MergeRecipe.model_validate(doc["recipe"]), layout=load_layout(doc["architecture"]),
                            parent_paths=[str(p) for p in config.parents], doc=doc)
        return write_text_atomic(output, text)
    if output_format == "mbw":
        lines = [f"# study {study.study_name}, trial {trial.number}, method {doc['recipe']['method']}"]
        lines += [f"{param}: {value}" for param, value in doc["mbw"].items()]
        return write_text_atomic(output, "\n".join(lines) + "\n")
    recipe = MergeRecipe.model_validate(doc["recipe"])
    config_dir = None
    if output_format == "diffusers":
        from optimizer.study.pipeline import render_config_dir

        config_dir = render_config_dir(parents, config_dir=config.config_dir)
    # recalibrated norms replay the study's own steps (through the runner's technique when there is one); LoRAs add in the kernel
    state = technique.export_state(config=config, parents=parents, recipe=recipe, built=getattr(runner, "technique", None))
    if state is None:
        return merge_to_file(parents=parents, recipe=recipe, output=output, output_format=output_format, config_dir=config_dir, overwrite=overwrite,
                             dtype=doc["output_dtype"])
    return write_merged(state_dict=state, parents=parents, recipe=recipe, output=output, output_format=output_format,
                        config_dir=config_dir, overwrite=overwrite, dtype=doc["output_dtype"])


def relocated(config: StudyConfig, *, study: optuna.Study, directory: str | os.PathLike[str]) -> StudyConfig:
    """``config`` with each parent found in ``directory`` by its file (or folder) name; the sha256
    stored in the study is checked when the weights are loaded. One clear error names a parent that
    is not there."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"--parents {directory}: no such folder")
    stored = stored_provenance(study)
    moved = []
    for i, path in enumerate(config.parents):
        candidate = directory / Path(path).name
        if not candidate.exists():
            known = f", sha256 {stored['parents'][i]['sha256'][:12]}…" if stored is not None else ""
            raise ExportError(f"parent {i}: {directory} holds no {Path(path).name} (the study ran with {path}{known})")
        moved.append(str(candidate.resolve()))
    return config.model_copy(update={"parents": moved})


def held_out_table(study: optuna.Study) -> dict[str, Any]:
    return json.loads(json.dumps(study.user_attrs.get(HELD_OUT_ATTR, {})))
