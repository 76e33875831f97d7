"""Study commands: ``study run`` / ``resume``, ``worker``, ``report``, ``export``, ``replay``, ``import``, ``dashboard``, ``samplers``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optimizer.cli.base import THREADS_HELP, _study_errors, app, fail
from optimizer.errors import EvomergeError

study_app = typer.Typer(help="Optuna studies over merge recipes: run, resume.", no_args_is_help=True)
app.add_typer(study_app, name="study")

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
            raise fail(f"{study} is not a study folder (no study.yaml)")
        config = load_study_config(folder.config)
    else:
        config = load_study_config(study)
        folder = StudyFolder(Path("out") / config.name)
    url = storage or folder.storage_url(config)
    try:
        loaded = optuna.load_study(study_name=config.name, storage=open_storage(url, heartbeat=config.heartbeat, create=False))
    except KeyError:
        raise fail(f"no study named {config.name!r} in {url}") from None
    return config, folder, loaded


def _run(config, folder, *, storage: str | None = None, progress: bool = True, salt: int = 0, threads: int | None = None) -> None:
    """Run (or join) the study of ``config`` in ``folder``; every check comes before anything is
    created. Ctrl-C: the running trial is failed and re-queued, the report is written, exit 130."""
    from optimizer.study.report import write_report
    from optimizer.study.loop import StudyInterrupted, run_study

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
    from optimizer.study.techniques import technique_class

    return technique_class(config.technique).export_hint(root)


def _architecture(study) -> str:
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if "architecture" in t.user_attrs:
            return t.user_attrs["architecture"]
    return study.user_attrs.get("architecture", "sd1")


def _summary(study, config, url: str) -> None:
    import optuna

    from optimizer.study.storage import redact

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState if states.count(s)}
    typer.echo(f"study {config.name}: {', '.join(f'{v} {k}' for k, v in counts.items())} (storage {redact(url)[1:-1]})")
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
        raise fail(str(exc)) from None


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
        raise fail(f"{folder} is not a study folder (no study.yaml)")
    try:
        _run(load_study_config(where.config), where, progress=progress, threads=threads)
    except _study_errors() as exc:
        raise fail(str(exc)) from None


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
        raise fail(f"no study named {study!r} in {storage}") from None
    except _study_errors() as exc:
        raise fail(str(exc)) from None
    try:
        config = config_from_study(loaded)
        import os
        import socket
        import zlib

        salt = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) or 1
        _run(config, StudyFolder(out or Path("out") / config.name), storage=storage, progress=progress, salt=salt, threads=threads)
    except _study_errors() as exc:
        raise fail(str(exc)) from None


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
        raise fail(str(exc)) from None
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
        raise fail(str(exc)) from None
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
        raise fail(str(exc)) from None
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
        raise fail(str(exc)) from None
    typer.echo(f"{source} -> {written} ({doc['recipe']['method']}, {len(doc['parents'])} parents)")

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
        raise fail(f"--port: {port} is not a TCP port (1 to 65535)")
    try:
        config, folder, _ = _open_study(study, storage=storage)
    except _study_errors() as exc:
        raise fail(str(exc)) from None
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
            raise fail(f"--port: port {port} on 127.0.0.1 {why}; give another --port") from None


@app.command("samplers")
def list_samplers(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False) -> None:
    """List the registered samplers: the Optuna class, evomerge's defaults, whether they handle mode: pareto."""
    import json

    from optimizer.study.sampler_registry import SAMPLERS

    rows = [{"name": e.name, "class": f"{(cls := e.factory()).__module__}.{cls.__qualname__}", "defaults": e.defaults,
             "multi_objective": e.multi_objective, "needs": e.needs, "summary": e.summary} for e in SAMPLERS.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        extra = ", ".join(f"{k}={v}" for k, v in row["defaults"].items()) or "none"
        typer.echo(f"{row['name']} ({row['class']}{'' if row['multi_objective'] else ', single-objective'}): {row['summary']}")
        typer.echo(f"  defaults: {extra}" + (f"; needs {row['needs']}" if row["needs"] else ""))
    typer.echo("or any optuna.samplers.BaseSampler subclass as module:Class")
