"""The article's fixed settings: the parent names, the alphas, the study files, the table's columns."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "studies" / "experiments"
#: the article's weights [0.6, 0.4]: A (shape) weighs 0.6, B (colour) 0.4; evomerge's alpha is B's weight
ARTICLE_ALPHA = 0.4
PAIR = ("shape", "colour")
CONTROL = ("base", "other_init")
PARENTS = ("base", "shape", "colour", "other_init")
ALPHAS = tuple(round(i / 10, 1) for i in range(11))
QUICK_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: the single-objective studies: key -> study file in studies/experiments/
STUDIES: dict[str, str] = {
    "global-tpe": "article-global-tpe.yaml",
    "blocks-tpe": "article-blocks-tpe.yaml",
    "blocks-cmaes": "article-blocks-cmaes.yaml",
    "negative-control": "article-negative-control.yaml",
}
PARETO_STUDY = "article-pareto-nsga2.yaml"
FIGURES = ["oracle_digit", "oracle_fg", "oracle_bg", "oracle_thickness", "oracle_slant", "oracle_all", "clip_score", "fid"]
TABLE = ["label", "oracle_digit", "oracle_fg", "oracle_bg", "oracle_all", "clip_score", "fid", "unet_evals_per_image"]
#: the columns :func:`run_article` averages over search seeds (others keep their value, or None where seeds differ)
METRICS = [*FIGURES, "unet_evals_per_image", "seconds_per_image", "search_score"]
#: the leading columns of experiments.csv
ID_COLUMNS = ["label", "n", "group", "study", "article", "alpha", "images", "trials"]
Z95 = 1.959963984540054  # standard normal 97.5% quantile


def _num(value: float) -> str:
    return f"{round(value, 4):g}"
