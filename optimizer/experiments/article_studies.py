"""The article's optimized rows: small Optuna studies run through the study code, best recipes replayed.

:func:`optimized_candidates` runs each study file of :data:`~optimizer.experiments.article_settings.STUDIES`
for several search seeds (budget, seed and, for quick runs, prompts and steps overridden), replays
each best trial with ``suggest_recipe(FixedTrial(best.params), space)`` as a
:class:`~optimizer.zoo.candidates.Candidate`, and runs the NSGA-II Pareto study against real renders
of the training domain (:func:`write_reference`). The search only ever sees search prompts; the
held-out evaluation is the caller's evaluator.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.experiments.article_settings import EXPERIMENTS, PARETO_STUDY, STUDIES
from optimizer.zoo.candidates import Candidate, CandidateEvaluator

__all__ = ["OptimizedResults", "optimized_candidates", "overridden_study_config", "write_reference"]


@dataclass
class OptimizedResults:
    """What :func:`optimized_candidates` found.

    ``candidates``: the best recipe of each (study, search seed) as a :class:`Candidate` (label
    ``optimized <study>``, extra ``search_seed``, ``search_score`` = best zoo CLIP on the search
    prompts, ``mbw``); ``frame``: their held-out rows (when an evaluator was given);
    ``histories``: one row per trial (study, search_seed, trial, state, value, best so far);
    ``recipes``: one row per best recipe with one column per block; ``pareto``: the NSGA-II front
    (trial, clip, kid on the search prompts, mbw, and held-out figures when evaluated);
    ``pareto_trials``: every complete trial of the Pareto study (trial, clip, kid)."""

    candidates: list[Candidate]
    frame: Any = None
    histories: Any = None
    recipes: Any = None
    pareto: Any = None
    pareto_trials: Any = None
    blocks: list[str] = field(default_factory=list)
    seconds: float = 0.0


def write_reference(*, folder: Path, count: int = 256, seed: int = 0) -> Path:
    """``count`` real renders of the zoo's training domain (train digits, training captions) as
    PNG files ``real-00000.png`` ... in ``folder``: the KID/FID reference of the Pareto study."""
    from PIL import Image

    from optimizer.zoo import domain

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = domain.samples(images="train", captions="train", count=count, seed=seed)
    for start in range(0, count, 128):
        chunk = items[start : start + 128]
        images = domain.render([s.index for s in chunk], [s.attributes for s in chunk])
        for i, image in enumerate(images):
            array = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()
            Image.fromarray(array, mode="RGB").save(folder / f"real-{start + i:05d}.png")
    return folder


def _quick_prompts(source: str, *, folder: Path, search_prompts: int | None, steps: int | None) -> str:
    """The study's prompt set, or a copy in ``folder`` with its first ``search_prompts`` search
    prompts and ``steps`` sampler steps (quick runs)."""
    if search_prompts is None and steps is None:
        return source
    import yaml

    data = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    if search_prompts is not None:
        data["search"] = data["search"][:search_prompts]
    if steps is not None:
        data["steps"] = int(steps)
    path = folder / "prompts.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return str(path)


def overridden_study_config(file: str, *, name: str, seed: int, trials: int, prompts: str | None, reference: Path | None = None):
    """The study file ``studies/experiments/<file>`` with name, sampler seed, trial budget, prompt
    set and (Pareto) reference folder overridden, validated again."""
    from optimizer.study.config import load_study_config, parse_study_config

    config = load_study_config(EXPERIMENTS / file)
    data = config.model_dump(mode="json")
    data["name"] = name
    data["sampler"] = {**data["sampler"], "seed": seed}
    data["budget"] = {"trials": trials, "seconds": None}
    if prompts is not None:
        data["prompts"] = prompts
    if reference is not None:
        data["scorers"] = {**data["scorers"], "reference": str(reference)}
    return parse_study_config(data, source=f"{file} (overridden)")


def _run(config, folder: Path, *, progress: bool):
    """Run one study in ``folder`` (Optuna's experimental/deprecation warnings silenced); the study
    and its runner. ``progress``: one line when it is done."""
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from optimizer.study.loop import run_study
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    started = time.perf_counter()
    study_folder = StudyFolder(folder)
    study_folder.write_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torchmetrics")
        runner = StudyRunner(config, folder=study_folder)
        study = run_study(config, folder=study_folder, runner=runner, progress=False)
    if progress:
        if len(study.directions) == 1:
            best = f"best {study.best_trial.value:.2f} (trial {study.best_trial.number})"
        else:
            best = f"{len(study.best_trials)} Pareto trials"
        print(f"  study {config.name}: {len(study.trials)} trials in {time.perf_counter() - started:.0f} s, {best}", flush=True)
    return study, runner


def _best_candidate(key: str, study, runner, *, seed: int, trials: int) -> tuple[Candidate, dict[str, Any]]:
    """The study's best trial replayed (``FixedTrial(best.params)``) as a candidate, and its recipe row."""
    import optuna

    from optimizer.study.space import suggest_recipe

    best = study.best_trial
    recipe = suggest_recipe(optuna.trial.FixedTrial(best.params), runner.space)
    layout = runner.space.layout
    mbw = recipe.to_mbw(layout=layout, param="alpha")
    values = recipe.params["alpha"]
    global_alpha = all(d.param != "alpha" or len(d.blocks) == len(layout.blocks) for d in runner.space.dimensions)
    alpha: float | str = float(values[layout.blocks[0]]) if global_alpha else mbw
    parents = tuple(runner.config.parents)
    candidate = Candidate(
        label=f"optimized {key}", parents=parents, alpha=alpha,
        extra={"group": "optimized", "alpha": float(alpha) if isinstance(alpha, float) else math.nan, "study": key, "search_seed": seed,
               "article": False, "search_score": float(best.value), "best_trial": best.number, "trials": trials, "mbw": mbw},
    )
    row = {"study": key, "search_seed": seed, "trial": best.number, "search_score": float(best.value), "mbw": mbw,
           **{b: float(values[b]) for b in layout.blocks}}
    return candidate, row


def _history(key: str, study, *, seed: int) -> list[dict[str, Any]]:
    rows, best = [], -math.inf
    for t in study.get_trials(deepcopy=False):
        value = t.value if t.state.name == "COMPLETE" else None
        if value is not None:
            best = max(best, value)
        rows.append({"study": key, "search_seed": seed, "trial": t.number, "state": t.state.name, "value": value,
                     "best": best if best > -math.inf else None})
    return rows


def optimized_candidates(
    *,
    studies: Sequence[str] = tuple(STUDIES),
    search_seeds: Sequence[int] = (0, 1, 2),
    trials: int = 30,
    pareto_trials: int | None = None,
    search_prompts: int | None = None,
    steps: int | None = None,
    reference_images: int = 256,
    evaluator: CandidateEvaluator | None = None,
    workdir: Path | None = None,
    progress: bool = False,
) -> OptimizedResults:
    """Run the article studies and return their best recipes as candidates (see :class:`OptimizedResults`).

    For each ``studies`` key (:data:`STUDIES`) and each search seed: the study file with its
    sampler seed set to the search seed and a budget of ``trials`` trials, run by
    :func:`optimizer.study.loop.run_study` in ``workdir`` (default: a temporary folder, removed);
    its ``best_trial.params`` are replayed with ``suggest_recipe(FixedTrial(params), space)`` and
    become a candidate (a global alpha, or the 26-value MBW string). The objective is the zoo CLIP
    on the SEARCH prompts (``search_prompts``: only the first N; ``steps``: sampler steps; both
    for quick runs). Then the Pareto study (NSGA-II, clip + KID against ``reference_images`` real
    renders written by :func:`write_reference`, seed ``search_seeds[0]``, ``pareto_trials``
    trials, default ``trials``; 0 skips it). With an ``evaluator`` every candidate and every
    Pareto trial is evaluated on its held-out set (``frame``, ``pareto``)."""
    import optuna
    import pandas as pd

    unknown = [k for k in studies if k not in STUDIES]
    if unknown:
        raise ValueError(f"unknown study {unknown[0]!r}; known: {', '.join(STUDIES)}")
    if not search_seeds or trials < 1:
        raise ValueError("give at least one search seed and one trial")
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="evomerge-article-") as scratch:
        root = Path(workdir) if workdir is not None else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        candidates: list[Candidate] = []
        histories: list[dict[str, Any]] = []
        recipes: list[dict[str, Any]] = []
        blocks: list[str] = []
        for key in studies:
            for seed in search_seeds:
                folder = root / f"{key}-seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                name = f"article-{key}-seed{seed}"
                base = overridden_study_config(STUDIES[key], name=name, seed=seed, trials=trials, prompts=None)
                prompts = _quick_prompts(base.prompts, folder=folder, search_prompts=search_prompts, steps=steps)
                config = overridden_study_config(STUDIES[key], name=name, seed=seed, trials=trials, prompts=prompts)
                study, runner = _run(config, folder, progress=progress)
                candidate, recipe = _best_candidate(key, study, runner, seed=seed, trials=trials)
                blocks = list(runner.space.layout.blocks)
                candidates.append(candidate)
                recipes.append(recipe)
                histories += _history(key, study, seed=seed)
                del runner
        result = OptimizedResults(candidates=candidates, histories=pd.DataFrame(histories), recipes=pd.DataFrame(recipes), blocks=blocks)
        if evaluator is not None and candidates:
            result.frame = evaluator.evaluate_all(candidates, progress=progress)
        n_pareto = trials if pareto_trials is None else pareto_trials
        if n_pareto > 0:
            result.pareto, result.pareto_trials = _pareto(root, seed=search_seeds[0], trials=n_pareto, search_prompts=search_prompts,
                                                          steps=steps, reference_images=reference_images, evaluator=evaluator,
                                                          progress=progress)
    result.seconds = time.perf_counter() - started
    return result


def _pareto(root: Path, *, seed: int, trials: int, search_prompts: int | None, steps: int | None, reference_images: int,
            evaluator: CandidateEvaluator | None, progress: bool):
    """The NSGA-II study's front (and all its complete trials) as DataFrames."""
    import optuna
    import pandas as pd

    from optimizer.study.space import suggest_recipe

    folder = root / f"pareto-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    reference = write_reference(folder=folder / "reference", count=reference_images, seed=seed)
    base = overridden_study_config(PARETO_STUDY, name=f"article-pareto-seed{seed}", seed=seed, trials=trials, prompts=None, reference=reference)
    prompts = _quick_prompts(base.prompts, folder=folder, search_prompts=search_prompts, steps=steps)
    config = overridden_study_config(PARETO_STUDY, name=f"article-pareto-seed{seed}", seed=seed, trials=trials, prompts=prompts, reference=reference)
    study, runner = _run(config, folder, progress=progress)
    names = [o.name for o in config.objectives]
    layout = runner.space.layout
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    everything = pd.DataFrame([{"trial": t.number, **dict(zip(names, t.values, strict=True))} for t in complete])
    front = sorted(study.best_trials, key=lambda t: -t.values[0])
    rows = []
    for t in front:
        recipe = suggest_recipe(optuna.trial.FixedTrial(t.params), runner.space)
        row: dict[str, Any] = {"trial": t.number, **{f"search_{n}": v for n, v in zip(names, t.values, strict=True)},
                               "mbw": recipe.to_mbw(layout=layout, param="alpha")}
        if evaluator is not None:
            candidate = Candidate(label=f"pareto trial {t.number}", parents=tuple(config.parents), alpha=row["mbw"])
            figures = evaluator.evaluate(candidate)
            row.update({k: figures[k] for k in ("oracle_all", "oracle_digit", "oracle_fg", "oracle_bg", "clip_score")})
        rows.append(row)
    return pd.DataFrame(rows), everything
