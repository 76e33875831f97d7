"""The ``evomerge`` command line (typer). Each command is a thin shell over a library function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="evomerge",
    help="Evolutionary per-block merge-ratio optimizer for Stable Diffusion checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A .safetensors/.ckpt file or a diffusers folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Architecture, blocks with key and parameter counts, dtypes and hashes of a checkpoint."""
    from optimizer.architectures.layout import LayoutError
    from optimizer.checkpoint.load import load_checkpoint
    from optimizer.checkpoint.types import CheckpointError
    from optimizer.describe import describe_checkpoint

    try:
        info = describe_checkpoint(load_checkpoint(path))
    except (CheckpointError, LayoutError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"{info['path']}")
    typer.echo(f"  architecture  {info['architecture']} ({info['title']}), format {info['format']}")
    typer.echo(f"  sha256        {info['sha256']}")
    typer.echo(f"  short hash    {info['short_hash']}   legacy hash {info['legacy_hash']}")
    typer.echo(f"  tensors       {info['tensors']}, parameters {info['parameters']:,}")
    typer.echo(f"  dtypes        {', '.join(f'{k}: {v}' for k, v in info['dtypes'].items())}")
    typer.echo(f"  {'block':<6} {'keys':>6} {'params':>14}")
    for block, row in info["blocks"].items():
        typer.echo(f"  {block:<6} {row['keys']:>6} {row['params']:>14,}")
    if info["merge_recipe"]:
        typer.echo(f"  merge recipe  {info['merge_recipe']}")


def _parse_params(values: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise _fail(f"--param takes NAME=VALUE or NAME=MBW-STRING, got {item!r}")
        parsed[name.strip()] = value.strip()
    return parsed


@app.command()
def merge(
    parents: Annotated[list[Path], typer.Argument(help="Parent checkpoints A B [C ...] (files or diffusers folders).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors file or diffusers folder.")],
    method: Annotated[str, typer.Option(help="Merge method (weighted_sum, add_difference, ties, dare, slerp).")] = "weighted_sum",
    alpha: Annotated[float | None, typer.Option(help="One alpha for every block (weight of B).")] = None,
    mbw: Annotated[str | None, typer.Option(help="Per-block alpha as a 26-value (SD1/2) or 20-value (SDXL) MBW string.")] = None,
    param: Annotated[list[str], typer.Option(help="Other method parameter: NAME=VALUE or NAME=MBW-STRING. Repeatable.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(help="Seed for stochastic methods (DARE).")] = 0,
    merge_vae: Annotated[bool, typer.Option(help="Merge the VAE too (default: copy it from the first parent).")] = False,
    dtype: Annotated[str | None, typer.Option(help="fp16, bf16 or fp32 (default: the parents' dtype).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    output_format: Annotated[str, typer.Option("--format", help="safetensors or diffusers.")] = "safetensors",
    config: Annotated[Path | None, typer.Option(help="Diffusers config folder for --format diffusers (default: the first parent's, or the shipped one).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Merge checkpoints per block and write the result (atomically, with A1111 merge metadata)."""
    from optimizer.architectures.layout import LayoutError
    from optimizer.checkpoint.types import CheckpointError
    from optimizer.merge import MergeError, get_method
    from optimizer.merge_files import load_parents, merge_to_file, recipe_from_strings

    if alpha is not None and mbw is not None:
        raise _fail("give --alpha or --mbw, not both")
    try:
        merge_method = get_method(method)
        params = _parse_params(param)
        if alpha is not None or mbw is not None:
            if "alpha" in params:
                raise _fail("alpha given twice (--alpha/--mbw and --param alpha=...)")
            params["alpha"] = mbw if mbw is not None else repr(alpha)
        loaded = load_parents(paths=parents, dtype=dtype, device=device)
        for note in loaded.notes:
            typer.echo(f"note: {note}")
        recipe = recipe_from_strings(
            method=merge_method.name, layout=loaded.bank.layout, params=params, seed=seed, merge_vae=merge_vae
        )
        written = merge_to_file(parents=loaded, recipe=recipe, output=output, output_format=output_format, config_dir=config,
            overwrite=overwrite,
        )
    except (CheckpointError, LayoutError, MergeError, ValueError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {written}")


@app.command()
def score(
    images: Annotated[Path, typer.Option("--images", help="Folder of images to score (sorted by file name).")],
    objective: Annotated[list[str], typer.Option("--objective", help="clip, fid, kid or aesthetic; repeat for several.")],
    prompts: Annotated[Path | None, typer.Option(help="One prompt per line in file-name order, or JSON {file: prompt} (clip).")] = None,
    reference: Annotated[Path | None, typer.Option(help="Folder of reference images (fid, kid).")] = None,
    reference_cache: Annotated[Path | None, typer.Option(help="Cache file for the reference features (fid, kid).")] = None,
    clip_model: Annotated[str, typer.Option(help="open_clip model name (clip, aesthetic).")] = "evomerge-digits-clip",
    clip_weights: Annotated[str | None, typer.Option(help="open_clip pretrained tag or local weights file; default for the zoo CLIP: the committed zoo's.")] = None,
    aesthetic_head: Annotated[Path | None, typer.Option(help="LAION linear head or improved-predictor MLP .pth (aesthetic).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Score a folder of images with CLIP score, FID, KID or an aesthetic head."""
    from objectives.fid import ReferenceSetError
    from objectives.aesthetic import AestheticHeadError
    from objectives.score_folder import build_objectives, score_folder

    if clip_model == "evomerge-digits-clip" and clip_weights is None:
        from optimizer.zoo import paths

        clip_weights = str(paths.clip_file(paths.default_zoo_dir()))
    try:
        built = build_objectives(
            objective,
            reference=reference,
            reference_cache=reference_cache,
            clip_model=clip_model,
            clip_weights=clip_weights,
            aesthetic_head=aesthetic_head,
        )
        rows = score_folder(images=images, objectives=built, prompts=prompts)
    except (ValueError, FileNotFoundError, ReferenceSetError, AestheticHeadError) as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'objective':<12} {'direction':<9} {'value':>12} {'images':>7}")
    for row in rows:
        typer.echo(f"{row['objective']:<12} {row['direction']:<9} {row['value']:>12.4f} {row['images']:>7}")


zoo_app = typer.Typer(help="The embedded zoo of small SD1-topology models trained on coloured digits.", no_args_is_help=True)
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
        raise _fail("--scale must be positive")
    typer.echo(f"built {build_zoo(out=out, scale=scale, evaluation_count=evaluation_count)}")


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
        raise _fail(str(exc)) from None
    typer.echo(f"zoo ok: {report['files']} files match the manifest" + (", quality figures reproduced" if measure else ""))


if __name__ == "__main__":
    app()
