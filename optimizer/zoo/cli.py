"""The embedded zoo's commands (``zoo build``, ``zoo adapters``, ``zoo check``): the demo layer, on top of the runtime.

The runtime's command line does not import this module: pyproject.toml declares :func:`register` in the
entry-point group ``evomerge.commands``, which :mod:`optimizer.cli` loads (as any installed plug-in's)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli.base import fail

zoo_app = typer.Typer(help="The embedded zoo of small SD1-topology models trained on coloured digits.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Entry point (group ``evomerge.commands``): add ``evomerge zoo ...`` to the runtime's command line."""
    app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
def zoo_build(
    out: Annotated[Path | None, typer.Option(help="Zoo folder (default: studies/zoo).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply every training step count (e.g. 0.05 for a smoke build).")] = 1.0,
    evaluation_count: Annotated[int | None, typer.Option(help="Held-out captions the quality table uses (default 200).")] = None,
) -> None:
    """Train every zoo model and scorer on CPU, export fp16 files, measure quality, write the manifest."""
    from optimizer.zoo.build import build_zoo

    if scale <= 0:
        raise fail("--scale must be positive")
    typer.echo(f"built {build_zoo(out=out, scale=scale, evaluation_count=evaluation_count)}")


@zoo_app.command("adapters")
def zoo_adapters(
    zoo: Annotated[Path | None, typer.Option(help="Zoo folder (default: studies/zoo).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply every training step count (e.g. 0.05 for a smoke run).")] = 1.0,
    measure: Annotated[bool, typer.Option(help="Measure the base with each adapter at a few strengths.")] = True,
) -> None:
    """Train the zoo's LoRA and hypernetwork on the base model; write them and adapters/adapters.json."""
    from optimizer.zoo.adapters import train_adapters

    if scale <= 0:
        raise fail("--scale must be positive")
    manifest = train_adapters(zoo=zoo, scale=scale, measure=measure)
    typer.echo("trained " + ", ".join(f"{a['file']} ({a['seconds']} s)" for a in manifest["adapters"]))


@zoo_app.command("check")
def zoo_check(
    zoo: Annotated[Path | None, typer.Option(help="Zoo folder (default: studies/zoo).")] = None,
    measure: Annotated[bool, typer.Option(help="Re-measure the quality figures (else hashes only).")] = True,
    fid: Annotated[bool, typer.Option(help="Include FID in the re-measurement (slowest part).")] = True,
) -> None:
    """Verify every file's sha256 against the manifest and re-measure the quality table."""
    from optimizer.zoo.build import ZooError, check_zoo

    try:
        report = check_zoo(zoo=zoo, measure=measure, fid=fid)
    except ZooError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"zoo ok: {report['files']} files match the manifest" + (", quality figures reproduced" if measure else ""))
