"""The article's merging claims, measured on the zoo (``python -m optimizer.experiments.article``).

An article on SD model merging claims, without numbers, that (1) merging two similar models with the
Checkpoint Merger (weighted sum) improves image quality and (2) merging two models of different
strengths "by weight ratio" (its example: run both models and sum their outputs with weights
[0.6, 0.4], an output ensemble) improves it significantly. Here every row is measured on the same
evaluation images: held-out captions (combinations no zoo model trained on, and none of them a
search prompt of the studies) on test digits, scored by the zoo oracle (attribute accuracies: digit,
fg, bg, thickness, slant, all five) and the zoo CLIP score.

Rows (:func:`sweep_candidates`, :func:`optimized_candidates`):

* the parents alone: ``base``, the fine-tunes ``shape`` and ``colour`` of base, and ``other_init``
  (a base from another initialisation);
* the Checkpoint Merger sweep ``(1 - alpha) shape + alpha colour``, alpha = 0, 0.1, ..., 1;
* output ensembles ``eps = (1 - alpha) eps_shape + alpha eps_colour`` per sampler step, over the
  same alphas, and the article's 0.6/0.4 (alpha = 0.4: evomerge's alpha is B's weight);
* the negative control: the weighted-sum sweep of ``base`` and ``other_init``;
* the best recipe of small Optuna studies (the study files ``studies/experiments/article-*.yaml``,
  budget and seed overridden): one global alpha (TPE), 26 block alphas (TPE, CMA-ES), and the
  negative control's 26 block alphas (TPE), each for several search seeds; they are summarized as
  mean and 95% t-interval over the seeds (:func:`summarize`);
* an NSGA-II Pareto study (zoo CLIP vs KID against real renders of the training domain), reported
  as its front (:attr:`OptimizedResults.pareto`), each Pareto trial also evaluated on the held-out set.

:func:`claims` turns the table into verdicts on the article's claims; :func:`run_article` writes
``experiments.csv``, ``experiments.md`` and the figures, atomically.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer.atomic import write_text_atomic
from optimizer.zoo import paths
from optimizer.zoo.candidates import PROMPTS, Candidate, CandidateEvaluator

__all__ = [
    "ARTICLE_ALPHA",
    "ArticleEvaluator",
    "ArticleResults",
    "Claim",
    "OptimizedResults",
    "STUDIES",
    "claims",
    "markdown_table",
    "optimized_candidates",
    "run_article",
    "summarize",
    "sweep_candidates",
    "write_reference",
]

from optimizer.experiments.article_figures import (
    _pareto_table,
    _plot_blocks,
    _plot_grid,
    _plot_histories,
    _plot_pareto,
    _plot_sweeps,
    markdown_table,
)
from optimizer.experiments.article_settings import (
    ALPHAS,
    ARTICLE_ALPHA,
    CONTROL,
    EXPERIMENTS,
    ID_COLUMNS,
    METRICS,
    PAIR,
    PARENTS,
    PARETO_STUDY,
    QUICK_ALPHAS,
    STUDIES,
    _num,
)
from optimizer.experiments.article_stats import Claim, claims, summarize


# ---------------------------------------------------------------------------------------------- evaluation
class ArticleEvaluator(CandidateEvaluator):
    """A :class:`CandidateEvaluator` whose evaluation images are strictly held out from the studies.

    The zoo's evaluation set draws captions from the held-out ``(digit, fg, bg)`` combinations,
    which also supply the study prompt set's search prompts; here every caption that is a search
    prompt of ``prompts`` is dropped (the first ``count`` remaining samples of a seeded draw, on
    test digits, with per-image seeds ``seed * 100000 + i``). Also renders candidates' images for
    grids (:meth:`images`)."""

    def __init__(self, *, zoo: Path | None = None, count: int = 100, steps: int = 20, guidance: float = 4.0, seed: int = 7,
                 prompts: Path | None = None, fid: bool = True) -> None:
        from optimizer.render.prompts import load_prompt_set
        from optimizer.zoo import domain
        from optimizer.zoo.build import quality_meter
        from optimizer.zoo.quality import EvaluationSet

        self.zoo = Path(zoo or paths.default_zoo_dir())
        search = {p.prompt for p in load_prompt_set(prompts or PROMPTS).prompts("search")}
        kept: list[domain.Sample] = []
        draw = 0
        while len(kept) < count:
            if draw == 100:
                raise ValueError("every held-out caption is a search prompt: nothing left to evaluate on")
            batch = domain.samples(images="test", captions="held_out", count=max(4 * count, 256), seed=seed * 1000 + draw)
            kept += [s for s in batch if s.caption not in search][: count - len(kept)]
            draw += 1
        real = domain.render([s.index for s in kept], [s.attributes for s in kept])
        self.evaluation = EvaluationSet(samples=kept, seeds=[seed * 100_000 + i for i in range(count)], real=real)
        self.meter = quality_meter(self.zoo, self.evaluation)
        self.steps, self.guidance = steps, guidance
        self.count = count
        self.fid = fid

    def evaluate(self, candidate: Candidate) -> dict[str, Any]:
        """The parent's row plus ``images`` (the evaluation count)."""
        return {**super().evaluate(candidate), "images": self.count}

    def images(self, candidate: Candidate, *, count: int = 8):
        """The first ``count`` evaluation images of ``candidate`` (``[N, 3, 32, 32]`` in [0, 1])."""
        from optimizer.zoo.models import generate

        with tempfile.TemporaryDirectory() as scratch:
            runner, recipe = self.runner(candidate, folder=Path(scratch))
            runner.prepare(recipe)
            return generate(runner.renderer.pipe, prompts=self.evaluation.captions[:count], seeds=self.evaluation.seeds[:count],
                            steps=self.steps, guidance=self.guidance)


# ---------------------------------------------------------------------------------------------- candidates


def sweep_candidates(*, alphas: Sequence[float] = ALPHAS, ensemble_alphas: Sequence[float] | None = None,
                     control_alphas: Sequence[float] | None = None) -> list[Candidate]:
    """The fixed rows: parents; weighted sums ``(1 - a) shape + a colour`` for ``a`` in ``alphas``;
    output ensembles ``(1 - a) eps_shape + a eps_colour`` for ``ensemble_alphas`` (default
    ``alphas``) plus the article's ``a = 0.4`` (0.6/0.4); weighted sums of ``base`` and
    ``other_init`` for ``control_alphas`` (default ``alphas``). 0.5 is always in the merge and
    control sweeps (the Checkpoint Merger default). Extra columns: ``group`` (parent, merge,
    ensemble, control), ``alpha``, ``study``, ``search_seed``, ``article`` (the article's setting)."""
    def extra(group: str, alpha: float | None, *, article: bool = False) -> dict[str, Any]:
        return {"group": group, "alpha": math.nan if alpha is None else float(alpha), "study": "", "search_seed": math.nan,
                "article": article}

    def with_(values: Sequence[float], *must: float) -> list[float]:
        return sorted({round(float(a), 4) for a in [*values, *must]})

    rows = [Candidate(label=name, parents=(name,), extra=extra("parent", None)) for name in PARENTS]
    for a in with_(alphas, 0.5):
        rows.append(Candidate(label=f"merge shape+colour {_num(a)}", parents=PAIR, alpha=a, extra=extra("merge", a, article=a == 0.5)))
    for a in with_(alphas if ensemble_alphas is None else ensemble_alphas, ARTICLE_ALPHA):
        rows.append(Candidate(label=f"ensemble shape+colour {_num(1 - a)}/{_num(a)}", parents=PAIR, alpha=a, technique="output_ensemble",
                              extra=extra("ensemble", a, article=a == ARTICLE_ALPHA)))
    for a in with_(alphas if control_alphas is None else control_alphas, 0.5):
        rows.append(Candidate(label=f"control base+other_init {_num(a)}", parents=CONTROL, alpha=a, extra=extra("control", a)))
    return rows + technique_rows()


def technique_rows(*, zoo: Path | None = None) -> list[Candidate]:
    """The techniques around merging on the Checkpoint Merger's 50/50 (group ``technique``):
    recalibration after the merge (and on the negative control); the zoo LoRA at 0.25 and the zoo
    hypernetwork at 0.5 on top of the merge, where ``studies/zoo/adapters`` is built."""
    from optimizer.zoo.adapters import adapter_file

    zoo = Path(zoo or paths.default_zoo_dir())

    def extra() -> dict[str, Any]:
        return {"group": "technique", "alpha": 0.5, "study": "", "search_seed": math.nan, "article": False}

    rows = [
        Candidate(label="merge shape+colour 0.5 + recalibrate", parents=PAIR, alpha=0.5, recalibrate=True, extra=extra()),
        Candidate(label="control base+other_init 0.5 + recalibrate", parents=CONTROL, alpha=0.5, recalibrate=True, extra=extra()),
    ]
    if (zoo / "adapters" / "adapters.json").is_file():
        lora, hyper = str(adapter_file(zoo, "lora-colour")), str(adapter_file(zoo, "hyper-clean"))
        rows += [
            Candidate(label="merge shape+colour 0.5 + LoRA colour x0.25", parents=PAIR, alpha=0.5, loras=((lora, 0.25),), extra=extra()),
            Candidate(label="merge shape+colour 0.5 + hypernetwork x0.5", parents=PAIR, alpha=0.5, hypernetworks=((hyper, 0.5),), extra=extra()),
        ]
    return rows


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


def _study_config(file: str, *, name: str, seed: int, trials: int, prompts: str | None, reference: Path | None = None):
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

    from optimizer.study.runner import StudyRunner, run_study
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
    :func:`optimizer.study.runner.run_study` in ``workdir`` (default: a temporary folder, removed);
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
                base = _study_config(STUDIES[key], name=name, seed=seed, trials=trials, prompts=None)
                prompts = _quick_prompts(base.prompts, folder=folder, search_prompts=search_prompts, steps=steps)
                config = _study_config(STUDIES[key], name=name, seed=seed, trials=trials, prompts=prompts)
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
    base = _study_config(PARETO_STUDY, name=f"article-pareto-seed{seed}", seed=seed, trials=trials, prompts=None, reference=reference)
    prompts = _quick_prompts(base.prompts, folder=folder, search_prompts=search_prompts, steps=steps)
    config = _study_config(PARETO_STUDY, name=f"article-pareto-seed{seed}", seed=seed, trials=trials, prompts=prompts, reference=reference)
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


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class ArticleResults:
    """What :func:`run_article` measured and wrote: ``rows`` (every evaluated row, one per search
    seed for optimized rows), ``summary`` (:func:`summarize` of ``rows``), ``claims``, the
    optimized studies' results, the files written and the seconds it took."""

    rows: Any
    summary: Any
    claims: list[Claim]
    optimized: OptimizedResults
    files: dict[str, Path]
    seconds: float
    settings: dict[str, Any]

    @property
    def claims_markdown(self) -> str:
        return "\n".join(f"- {c.text}" for c in self.claims) + "\n"


QUICK = {"count": 16, "steps": 8, "trials": 3, "search_seeds": (0, 1), "search_prompts": 16, "alphas": QUICK_ALPHAS, "reference_images": 64,
         "pareto_trials": 3}
FULL = {"count": 100, "steps": 20, "trials": 30, "search_seeds": (0, 1, 2), "search_prompts": None, "alphas": ALPHAS,
        "reference_images": 256, "pareto_trials": 30}


def run_article(*, out: str | os.PathLike[str], quick: bool = False, zoo: Path | None = None, progress: bool = True,
                **overrides: Any) -> ArticleResults:
    """Evaluate every row (:func:`sweep_candidates`, :func:`optimized_candidates`) and write into ``out``:
    ``experiments.csv`` (the summary: one row per label, ``<metric>`` mean and ``<metric>_ci95``),
    ``experiments-rows.csv`` (every evaluated row), ``experiments.md`` (the table, the claims, the
    Pareto front), ``histories.csv``, ``recipes.csv``, ``pareto.csv`` and the figures
    ``alpha_sweep.png``, ``histories.png``, ``block_weights.png``, ``pareto.png``, ``grid.png``;
    every file atomically (temporary file, then ``os.replace``).

    Settings (``overrides`` replace any): full: 100 evaluation images, 20 steps, 30 trials, search
    seeds 0, 1, 2, all 48 search prompts, alphas 0..1 by 0.1; ``quick``: 16 images, 8 steps, 3
    trials, seeds 0, 1, 16 search prompts, alphas 0, 0.25, ..., 1 (a couple of minutes on 2 cores)."""
    import pandas as pd

    settings = {**(QUICK if quick else FULL)}
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise TypeError(f"run_article: unknown setting(s) {unknown}; known: {sorted(settings)}")
    settings.update(overrides)
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    evaluator = ArticleEvaluator(zoo=zoo, count=settings["count"], steps=settings["steps"])
    sweep = sweep_candidates(alphas=settings["alphas"])
    if progress:
        print(f"{len(sweep)} fixed candidates on {settings['count']} held-out images, {settings['steps']} steps", flush=True)
    fixed = evaluator.evaluate_all(sweep, progress=progress)
    if progress:
        print(f"studies: {len(STUDIES)} x seeds {list(settings['search_seeds'])} x {settings['trials']} trials; "
              f"Pareto {settings['pareto_trials']} trials", flush=True)
    optimized = optimized_candidates(
        search_seeds=settings["search_seeds"], trials=settings["trials"], pareto_trials=settings["pareto_trials"],
        search_prompts=settings["search_prompts"], steps=settings["steps"] if quick or "steps" in overrides else None,
        reference_images=settings["reference_images"], evaluator=evaluator, progress=progress,
    )
    rows = pd.concat([fixed, optimized.frame], ignore_index=True) if optimized.frame is not None else fixed
    summary = summarize(rows, by="label", metrics=[m for m in METRICS if m in rows.columns])
    verdicts = claims(summary)

    files: dict[str, Path] = {}
    csv_columns = [c for c in ID_COLUMNS if c in summary.columns]
    csv_columns += [c for m in METRICS for c in (m, f"{m}_ci95") if c in summary.columns]
    files["csv"] = write_text_atomic(out / "experiments.csv", summary[csv_columns].to_csv(index=False))
    files["rows"] = write_text_atomic(out / "experiments-rows.csv", rows.to_csv(index=False))
    files["histories"] = write_text_atomic(out / "histories.csv", optimized.histories.to_csv(index=False))
    files["recipes"] = write_text_atomic(out / "recipes.csv", optimized.recipes.to_csv(index=False))
    files["alpha_sweep"] = _plot_sweeps(summary, out / "alpha_sweep.png")
    if len(optimized.histories):
        files["histories_plot"] = _plot_histories(optimized.histories, out / "histories.png")
    if len(optimized.recipes):
        files["block_weights"] = _plot_blocks(optimized.recipes, optimized.blocks, out / "block_weights.png")
    pareto_md = ""
    if optimized.pareto is not None and len(optimized.pareto):
        files["pareto"] = write_text_atomic(out / "pareto.csv", optimized.pareto.to_csv(index=False))
        files["pareto_plot"] = _plot_pareto(optimized.pareto, optimized.pareto_trials, out / "pareto.png")
        pareto_md = "\n## NSGA-II Pareto front (search prompts: zoo CLIP vs KID; held-out figures alongside)\n\n" + _pareto_table(optimized.pareto)
    by_label: dict[str, Candidate] = {}
    for candidate in [*sweep, *optimized.candidates]:
        by_label.setdefault(candidate.label, candidate)  # optimized rows: the first search seed's recipe
    shown = ["shape", "colour", "merge shape+colour 0.5", f"ensemble shape+colour {_num(1 - ARTICLE_ALPHA)}/{_num(ARTICLE_ALPHA)}",
             "optimized blocks-tpe", "optimized blocks-cmaes", "control base+other_init 0.5"]
    grid = [by_label[label] for label in shown if label in by_label]
    files["grid"] = _plot_grid(evaluator, grid, out / "grid.png")

    seconds = time.perf_counter() - started
    seeds = ", ".join(str(s) for s in settings["search_seeds"])
    subset = "" if settings["search_prompts"] is None else f", first {settings['search_prompts']} search prompts"
    text = [
        "# The article's merging claims, measured on the zoo",
        "",
        f"{settings['count']} evaluation images (held-out captions, none a search prompt; test digits; fixed seeds), "
        f"{settings['steps']} sampler steps, CFG {evaluator.guidance}; studies: {settings['trials']} trials each, search seeds {seeds}"
        f"{subset}; "
        f"{'quick' if quick else 'full'} run in {seconds:.0f} s. Optimized rows: mean ± 95% t-interval over search seeds.",
        "",
        markdown_table(summary),
        "## The article's claims (judged on oracle_all)",
        "",
        "".join(f"- {c.text}\n" for c in verdicts),
        pareto_md,
        "Figures: `alpha_sweep.png`, `histories.png`, `block_weights.png`, `pareto.png`, `grid.png`.",
        "",
    ]
    files["markdown"] = write_text_atomic(out / "experiments.md", "\n".join(text))
    return ArticleResults(rows=rows, summary=summary, claims=verdicts, optimized=optimized, files=files, seconds=seconds, settings=settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("studies/results/experiments"))
    parser.add_argument("--quick", action="store_true", help="16 images, 8 steps, 3 trials, 2 seeds: a couple of minutes")
    parser.add_argument("--count", type=int)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--seeds", type=int, help="search seeds 0..N-1")
    parser.add_argument("--write-reference", type=Path, metavar="DIR", help="only write the Pareto study's real renders into DIR")
    args = parser.parse_args(argv)
    if args.write_reference is not None:
        print(write_reference(folder=args.write_reference))
        return
    overrides: dict[str, Any] = {}
    if args.count is not None:
        overrides["count"] = args.count
    if args.trials is not None:
        overrides["trials"] = overrides["pareto_trials"] = args.trials
    if args.seeds is not None:
        overrides["search_seeds"] = tuple(range(args.seeds))
    result = run_article(out=args.out, quick=args.quick, **overrides)
    print(markdown_table(result.summary))
    print(result.claims_markdown)
    print(f"wrote {result.files['markdown']} in {result.seconds:.0f} s")


if __name__ == "__main__":
    main()
