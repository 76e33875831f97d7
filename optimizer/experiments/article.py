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

The optimized rows are run by :mod:`optimizer.experiments.article_studies`; the statistics live in
:mod:`optimizer.experiments.article_stats` and the figures in :mod:`optimizer.experiments.article_figures`.

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
from dataclasses import dataclass
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
    ID_COLUMNS,
    METRICS,
    PAIR,
    PARENTS,
    QUICK_ALPHAS,
    STUDIES,
    _num,
)
from optimizer.experiments.article_stats import Claim, claims, summarize
from optimizer.experiments.article_studies import OptimizedResults, optimized_candidates, write_reference


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
