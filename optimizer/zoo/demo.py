"""``make demo``: the main job, a real study on the embedded zoo (CPU, about 5 minutes on 2 cores).

Runs ``studies/zoo-shape-colour.yaml``: Optuna (TPE, warm-started with the 50/50 Checkpoint Merger,
both parents and a hand-made MBW recipe) searches the 26 per-block weights that merge the zoo's
shape specialist with its colour specialist; each trial merges in place (no disk), renders the
search prompts and scores them with the zoo CLIP. Then, on the **held-out** prompts that the search
never saw, the best recipe is compared with the parents and the plain 50/50 merge (zoo CLIP score,
and the oracle's accuracy on digit and colours, which the search never optimized), exported as a
recipe and as an A1111 single file, and the report and dashboard commands are printed.

``EVOMERGE_DEMO_TRIALS`` overrides the trial budget (tests use a handful).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from optimizer.merge import MergeRecipe
from optimizer.zoo import domain, paths
from optimizer.zoo.build import ZooError

STUDY = Path(__file__).resolve().parents[2] / "studies" / "zoo-shape-colour.yaml"
OUT = Path("out/demo")


def main() -> None:
    import optuna

    from optimizer.render.grid import save_grid
    from optimizer.study.config import load_study_config
    from optimizer.study.export import export_trial
    from optimizer.study.report import write_report
    from optimizer.study.runner import StudyRunner
    from optimizer.study.loop import run_study
    from optimizer.study.storage import StudyFolder
    from optimizer.zoo.oracle import load_oracle

    zoo = paths.default_zoo_dir()
    if not (zoo / paths.MANIFEST).is_file():
        raise SystemExit(f"no zoo at {zoo}: run `evomerge zoo build` first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_study_config(STUDY)
    trials = int(os.environ.get("EVOMERGE_DEMO_TRIALS", config.budget.trials or 60))
    config = config.model_copy(update={"budget": config.budget.model_copy(update={"trials": trials})})
    folder = StudyFolder(OUT / config.name)
    if folder.root.exists():
        shutil.rmtree(folder.root)  # the demo starts fresh; `evomerge study run` resumes instead
    folder.write_config(config)

    started = time.perf_counter()
    runner = StudyRunner(config, folder=folder)
    print(f"study {config.name}: {len(runner.space.names)} searched values, {len(runner.prompt_set.jobs('search'))} search images per trial, "
          f"{trials} trials; built parents, pipeline and scorers once in {runner.setup_seconds:.1f} s")
    study = run_study(config, folder=folder, runner=runner)
    best = study.best_trial
    seconds = [t.user_attrs["seconds"] for t in study.trials if t.state.name == "COMPLETE"]
    merge_ms = sorted(s["merge"] for s in seconds)[len(seconds) // 2] * 1e3
    print(f"{len(study.trials)} trials in {time.perf_counter() - started:.0f} s (median merge {merge_ms:.1f} ms, in place, no disk I/O); "
          f"best: trial {best.number}, zoo CLIP score {best.value:.2f}")

    # held-out comparison: prompts the search never rendered
    layout = runner.space.layout
    candidates = {
        "shape (parent A)": MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.0),
        "colour (parent B)": MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=1.0),
        "weighted sum 0.5": MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.5),
        f"best (trial {best.number})": MergeRecipe.model_validate(best.user_attrs["recipe"]),
    }
    oracle = load_oracle(paths.oracle_dir(zoo))
    jobs = runner.prompt_set.jobs("held_out")
    attributes = [domain.parse_caption(j.prompt) for j in jobs]
    print(f"\n{len(jobs)} held-out prompts (never seen by the search):")
    print(f"  {'recipe':22s} {'CLIP':>6s} {'digit':>6s} {'fg':>6s} {'bg':>6s}")
    for label, recipe in candidates.items():
        runner.technique.merger.merge(recipe)
        images = runner.renderer.render(jobs)
        clip = runner.objectives[0]
        clip.reset()
        clip.update(images, prompts=[j.prompt for j in jobs])
        acc = oracle.accuracy(images.cpu(), attributes)
        print(f"  {label:22s} {clip.compute():6.2f} {acc['digit']:6.3f} {acc['fg']:6.3f} {acc['bg']:6.3f}")
        if label.startswith("best"):
            grid = save_grid(images[:32], folder.root / "best_held_out.png", nrow=8)

    exports = folder.exports
    recipe_file = export_trial(study=study, config=config, trial=best, output_format="recipe", output=exports / "best.yaml",
                               parents=runner.parents, overwrite=True)
    merged = export_trial(study=study, config=config, trial=best, output_format="safetensors", output=exports / "best.safetensors",
                          parents=runner.parents, overwrite=True)
    report = write_report(study, folder=folder.report, architecture=layout.name)
    print(f"\nbest recipe: {recipe_file}\n  MBW alpha: {best.user_attrs['mbw']['alpha']}")
    print(f"merged checkpoint (A1111 single file with sd_merge_recipe metadata): {merged}")
    print(f"held-out images of the best recipe: {grid}")
    print(f"report: {report['markdown']} and {', '.join(p.name for k, p in report.items() if k not in ('markdown', 'csv'))}")
    print(f"dashboard: .venv/bin/evomerge dashboard {folder.root}   then open http://127.0.0.1:8080")


if __name__ == "__main__":
    try:
        main()
    except ZooError as exc:
        raise SystemExit(str(exc)) from None
