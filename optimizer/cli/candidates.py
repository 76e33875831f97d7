"""Rendering candidates side by side: ``render``, ``compare``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli.base import _study_errors, app, fail
from optimizer.errors import EvomergeError


@app.command()
def render(
    candidate: Annotated[Path, typer.Argument(help="A checkpoint (file or diffusers folder) or a recipe document.")],
    prompts: Annotated[Path, typer.Option(help="Prompt set YAML (prompts x seeds; the study's format).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder: NNN.png per image, grid.png, render.json.")],
    split: Annotated[str, typer.Option(help="held_out or search.")] = "held_out",
    parents: Annotated[Path | None, typer.Option("--parents", help="A recipe's parents and LoRAs, by file name, when they moved.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Diffusers config folder for the pipeline (default: found as for merge).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing render folder.")] = False,
) -> None:
    """Render a checkpoint or a recipe on a prompt set with the study's seeded renderer."""
    from optimizer.render.prompts import load_prompt_set
    from optimizer.study.candidates import render_candidate

    try:
        written = render_candidate(candidate, prompt_set=load_prompt_set(prompts), output=output, split=_split(split), parents_dir=parents,
                                   config_dir=config, device=device, overwrite=overwrite)
    except (*_study_errors(), EvomergeError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{candidate} -> {written}")


@app.command()
def compare(
    candidates: Annotated[list[Path], typer.Argument(help="Two or more checkpoints or recipe documents (the grid's rows).")],
    prompts: Annotated[Path, typer.Option(help="Prompt set YAML (the grid's columns: prompts x seeds, the same for every row).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The grid PNG (a .json beside it lists rows and columns).")],
    label: Annotated[list[str] | None, typer.Option(help="A label per candidate, in order (default: file names).")] = None,
    split: Annotated[str, typer.Option(help="held_out or search.")] = "held_out",
    parents: Annotated[Path | None, typer.Option("--parents", help="Recipes' parents and LoRAs, by file name, when they moved.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Diffusers config folder for the pipelines.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing grid.")] = False,
) -> None:
    """Candidates x prompts in one labelled grid, every candidate on the same prompts and seeds."""
    from optimizer.render.prompts import load_prompt_set
    from optimizer.study.candidates import compare_candidates

    try:
        written = compare_candidates(candidates, prompt_set=load_prompt_set(prompts), output=output, split=_split(split), labels=label or None,
                                     parents_dir=parents, config_dir=config, device=device, overwrite=overwrite)
    except (*_study_errors(), EvomergeError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{len(candidates)} candidates -> {written}")


def _split(split: str) -> str:
    if split not in ("held_out", "search"):
        raise fail(f"--split {split!r}: use held_out or search")
    return split
