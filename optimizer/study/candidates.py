"""Rendering checkpoints and recipes outside a study: ``evomerge render`` and ``evomerge compare``.

A candidate is a checkpoint (single file or diffusers folder) or a recipe document (``export
--format recipe``). A recipe is first replayed (:mod:`optimizer.study.replay`: sha256-checked
parents, LoRAs, recalibration) into a temporary checkpoint beside the output, so a candidate
renders exactly the weights ``export`` would write. Each candidate renders the same jobs of a
prompt set (prompts x seeds of one split) with the study's seeded renderer: image ``j`` of every
candidate starts from the same noise, so differences between candidates come from the weights alone.
Candidates are loaded one at a time, in fp32 on CPU as a study's parents are (the parents' dtype on GPU).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from optimizer.render.prompts import PromptSet, RenderJob
from optimizer.study.export import ExportError

__all__ = ["compare_candidates", "render_candidate"]


def _is_recipe(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in (".yaml", ".yml")


@contextmanager
def _checkpoint_of(candidate: Path, *, scratch: Path, parents_dir, config_dir, device: str) -> Iterator[tuple[Path, Path | None]]:
    """``(checkpoint, config folder)`` to render ``candidate``: itself, or its recipe replayed into
    ``scratch`` with the render configs of its first parent (or of the recipe's study)."""
    if not _is_recipe(candidate):
        if not candidate.exists():
            raise ExportError(f"no checkpoint or recipe at {candidate}")
        yield candidate, config_dir
        return
    from optimizer.merge_files import own_config_dir
    from optimizer.study.export import load_recipe_document
    from optimizer.study.replay import located_parents, replay_to_file

    doc = load_recipe_document(candidate)
    if config_dir is None and doc.get("config_dir") and Path(doc["config_dir"]).is_dir():
        config_dir = Path(doc["config_dir"])
    if config_dir is None:
        config_dir = own_config_dir(located_parents(doc, directory=parents_dir)[0])
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".evomerge-candidate-") as tmp:
        yield replay_to_file(doc, output=Path(tmp) / f"{candidate.stem}.safetensors", parents_dir=parents_dir, config_dir=config_dir,
                             device=device), config_dir


def _render(checkpoint: Path, jobs: Sequence[RenderJob], *, prompt_set: PromptSet, config_dir, device: str, batch_size) -> torch.Tensor:
    from optimizer.merge_files import load_parents, resolve_device
    from optimizer.render.renderer import Renderer
    from optimizer.study.pipeline import parent_pipeline

    dtype = "fp32" if resolve_device(device).type == "cpu" else None  # as a study's bank: fp16 kernels are slow on CPU
    parents = load_parents(paths=[checkpoint], device=device, dtype=dtype, minimum=1)
    pipe = parent_pipeline(parents=parents, index=0, config_dir=config_dir)
    images = Renderer(pipe, prompt_set=prompt_set, batch_size=batch_size).render(list(jobs)).detach().float().cpu()
    del pipe, parents
    return images


def _jobs(prompt_set: PromptSet, split: str) -> list[RenderJob]:
    jobs = prompt_set.jobs(split)
    if not jobs:
        raise ExportError(f"the prompt set has no {split} prompts")
    return jobs


def render_candidate(
    candidate: str | os.PathLike[str],
    *,
    prompt_set: PromptSet,
    output: str | os.PathLike[str],
    split: str = "held_out",
    parents_dir: str | os.PathLike[str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | str = "auto",
    overwrite: bool = False,
) -> Path:
    """Render ``candidate`` on every job of ``split`` into the folder ``output`` (written whole or
    not at all): ``NNN.png`` per job in job order, ``grid.png`` and ``render.json`` (the candidate,
    and per image its file, prompt, negative prompt and seed)."""
    from optimizer.atomic import atomic_folder, check_output
    from optimizer.render.grid import grid_image

    candidate = Path(candidate)
    jobs = _jobs(prompt_set, split)
    output = check_output(output, overwrite=overwrite, folder=True, replaceable=lambda p: (p / "render.json").is_file(),
                          what="render folder")
    with _checkpoint_of(candidate, scratch=_scratch(output), parents_dir=parents_dir, config_dir=config_dir, device=device) as (checkpoint, configs):
        images = _render(checkpoint, jobs, prompt_set=prompt_set, config_dir=configs, device=device, batch_size=batch_size)
    index: dict[str, Any] = {"candidate": str(candidate), "split": split, "images": []}
    with atomic_folder(output) as tmp:
        for i, (job, image) in enumerate(zip(jobs, images, strict=True)):
            name = f"{i:03d}.png"
            grid_image(image[None], nrow=1).save(tmp / name)
            index["images"].append({"file": name, "prompt": job.prompt, "negative": job.negative, "seed": job.seed})
        grid_image(images, labels=[f"{job.prompt} (seed {job.seed})" for job in jobs]).save(tmp / "grid.png")
        (tmp / "render.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return output


def compare_candidates(
    candidates: Sequence[str | os.PathLike[str]],
    *,
    prompt_set: PromptSet,
    output: str | os.PathLike[str],
    split: str = "held_out",
    labels: Sequence[str] | None = None,
    parents_dir: str | os.PathLike[str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | str = "auto",
    overwrite: bool = False,
) -> Path:
    """One PNG grid at ``output``: a row per candidate, a column per job (same prompts, same seeds),
    each tile labelled with the candidate's label and the prompt; a ``.json`` beside it lists rows
    and columns. Every candidate is found (and recipes checked) before the first render."""
    from optimizer.atomic import check_output, write_text_atomic
    from optimizer.render.grid import save_grid

    paths = [Path(c) for c in candidates]
    if len(paths) < 2:
        raise ExportError("compare needs at least two candidates")
    names = list(labels) if labels is not None else [p.stem for p in paths]
    if len(names) != len(paths):
        raise ExportError(f"{len(names)} labels for {len(paths)} candidates")
    for path in paths:
        if not path.exists():
            raise ExportError(f"no checkpoint or recipe at {path}")
        if _is_recipe(path):
            from optimizer.study.export import load_recipe_document

            load_recipe_document(path)
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ExportError(f"the comparison grid is a PNG file; got {output}")
    output = check_output(output, overwrite=overwrite, folder=False, what="grid")
    jobs = _jobs(prompt_set, split)
    rows = []
    for path in paths:
        with _checkpoint_of(path, scratch=_scratch(output), parents_dir=parents_dir, config_dir=config_dir, device=device) as (checkpoint, configs):
            rows.append(_render(checkpoint, jobs, prompt_set=prompt_set, config_dir=configs, device=device, batch_size=batch_size))
    tiles = [f"{name}: {job.prompt}" for name in names for job in jobs]
    written = save_grid(torch.cat(rows), output, nrow=len(jobs), labels=tiles)
    sidecar = {"rows": [{"label": n, "candidate": str(p)} for n, p in zip(names, paths, strict=True)],
               "columns": [{"prompt": j.prompt, "negative": j.negative, "seed": j.seed} for j in jobs], "split": split}
    write_text_atomic(output.with_suffix(".json"), json.dumps(sidecar, indent=1) + "\n")
    return written


def _scratch(output: Path) -> Path:
    """Where a replayed recipe's temporary checkpoint goes: beside the output when that folder exists."""
    return output.parent if output.parent.is_dir() else Path(tempfile.gettempdir())
