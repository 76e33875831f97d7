"""Commands on checkpoint files: ``inspect``, ``merge``, ``extract-lora``."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli.base import _study_errors, app, fail
from optimizer.errors import EvomergeError


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
        raise fail(str(exc)) from None
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


def _check_uniform_params(method, params: dict[str, str], *, n_parents: int) -> None:
    """Range-check the parameters given as one number before any parent is loaded."""
    from optimizer.merge_files import check_parent_count

    check_parent_count(n_parents)
    method.check_parents(n_parents)
    for name, text in params.items():
        try:
            value = float(text)
        except ValueError:
            continue  # an MBW string: checked per block when the recipe is built
        method.check_value(name, value)


def _parse_params(values: list[str]) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise fail(f"--param takes NAME=VALUE or NAME=MBW-STRING, got {item!r}")
        parsed[name.strip()] = value.strip()
    return parsed


_LORA_ARG = re.compile(r"^(?P<path>.+?)(?::(?P<strength>[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?))?(?::(?P<lbw>[A-Za-z0-9_.,]+))?$")


def _cli_loras(items: list[str], *, parents, config: Path | None):
    """``--lora PATH[:STRENGTH[:LBW]]`` items -> (loaded LoRAs, recipe strengths ``{name: {block: s}}``)."""
    if not items:
        return [], {}
    from optimizer.adapters.lbw import parse_lbw
    from optimizer.adapters.lora import load_loras
    from optimizer.study.pipeline import unet_config

    specs = []
    for item in items:
        m = _LORA_ARG.match(item)
        if m is None:
            raise fail(f"--lora takes PATH[:STRENGTH[:LBW]], got {item!r}")
        path = Path(m.group("path"))
        specs.append((path, float(m.group("strength") or 1.0), m.group("lbw")))
    names = [p.stem for p, _, _ in specs]
    if len(set(names)) != len(names):
        raise fail(f"--lora: two LoRA files share a name {names}; rename one")
    loaded = load_loras([(p.stem, p) for p, _, _ in specs], bank=parents.bank, unet_config=unet_config(parents, config_dir=config))
    layout = parents.bank.layout
    strengths = {}
    for lora_, (_, strength, lbw) in zip(loaded, specs, strict=True):
        if lbw:
            strengths[lora_.name] = parse_lbw(lbw, layout=layout, touched=lora_.blocks, strength=strength)
        else:
            strengths[lora_.name] = dict.fromkeys(lora_.blocks, strength)
    return loaded, strengths


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
    output_format: Annotated[str, typer.Option("--format", help="safetensors, bare (Flux/SD3 transformer alone, BFL/SAI names) or diffusers.")] = "safetensors",
    config: Annotated[Path | None, typer.Option(help="Diffusers config folder for --format diffusers (default: the first parent's, or the shipped one).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    placement: Annotated[str, typer.Option(help="device (parents on the device) or host (parents in host memory, streamed per block: parents too big for the GPU).")] = "device",
    lora: Annotated[list[str], typer.Option(help="Bake a LoRA into the merge: PATH[:STRENGTH[:LBW]] (LBW: a block weight string or preset such as OUTALL). Repeatable.")] = [],  # noqa: B006
    allow_nonfinite: Annotated[bool, typer.Option(help="Merge parents that hold NaN/Inf values (refused by default).")] = False,
) -> None:
    """Merge checkpoints per block and write the result (atomically, with A1111 merge metadata).

    Parameters not given take the method's defaults (weighted_sum: alpha 0.5), and a note says so."""
    from optimizer.architectures.layout import LayoutError
    from optimizer.checkpoint.types import CheckpointError
    from optimizer.merge import MergeError, get_method
    from optimizer.merge_files import check_merged_output, load_parents, merge_to_file, recipe_from_strings

    if alpha is not None and mbw is not None:
        raise fail("give --alpha or --mbw, not both")
    if output_format not in ("safetensors", "bare", "diffusers"):
        raise fail(f"--format: unknown output format {output_format!r}; use safetensors, bare or diffusers")
    try:
        merge_method = get_method(method)
        params = _parse_params(param)
        if alpha is not None or mbw is not None:
            if "alpha" in params:
                raise fail("alpha given twice (--alpha/--mbw and --param alpha=...)")
            params["alpha"] = mbw if mbw is not None else repr(alpha)
        _check_uniform_params(merge_method, params, n_parents=len(parents))
        check_merged_output(output, output_format=output_format, overwrite=overwrite)
        loaded = load_parents(paths=parents, dtype=dtype, device=device, placement=placement, allow_nonfinite=allow_nonfinite)
        for note in loaded.notes:
            typer.echo(f"note: {note}")
        defaults = [p for p in merge_method.param_names(loaded.bank.n_parents) if p not in params]
        if defaults:
            typer.echo("note: not given, the method's default for every block: "
                       + ", ".join(f"{p} {merge_method.params[p]:g}" for p in defaults))
        recipe = recipe_from_strings(
            method=merge_method.name, layout=loaded.bank.layout, params=params, seed=seed, merge_vae=merge_vae
        )
        loras, strengths = _cli_loras(lora, parents=loaded, config=config)
        recipe = recipe.model_copy(update={"loras": strengths})
        written = merge_to_file(parents=loaded, recipe=recipe, output=output, output_format=output_format, config_dir=config,
            overwrite=overwrite, loras=loras, warn=lambda text: typer.secho(f"warning: {text}", err=True, fg=typer.colors.YELLOW),
        )
    except (CheckpointError, LayoutError, MergeError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {written}")

@app.command("extract-lora")
def extract_lora(
    merged: Annotated[Path, typer.Argument(help="The merged checkpoint (file or diffusers folder).")],
    base: Annotated[Path, typer.Argument(help="The base it should apply to.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The LoRA (.safetensors, kohya format).")],
    rank: Annotated[int, typer.Option(min=1, help="Rank per layer (the best rank-R approximation of each layer's change).")] = 32,
    config: Annotated[Path | None, typer.Option("--config", help="Diffusers config folder (names the UNet modules).")] = None,
    dtype: Annotated[str, typer.Option(help="fp16, bf16 or fp32 for the stored factors.")] = "fp16",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N (the SVDs run there).")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Extract the difference MERGED - BASE as a LoRA: per-layer SVD, conv layers included."""
    from optimizer.extract_files import extract_lora_file

    try:
        written, summary = extract_lora_file(merged=merged, base=base, rank=rank, output=output, config_dir=config, dtype=dtype, device=device,
                                             overwrite=overwrite)
    except (*_study_errors(), EvomergeError) as exc:
        raise fail(str(exc)) from None
    typer.echo(f"{summary['layers']} layers at rank {summary['rank']} -> {written} (relative error per layer: mean {summary['mean_relative_error']:.3g}, "
               f"max {summary['max_relative_error']:.3g}; {summary['not_captured']} changed tensors a LoRA cannot hold)")
