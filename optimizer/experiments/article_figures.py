"""The article's outputs: the markdown table and the figures, each written atomically."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from optimizer.atomic import write_atomic
from optimizer.experiments.article_settings import ARTICLE_ALPHA, TABLE
from optimizer.zoo.candidates import Candidate

if TYPE_CHECKING:
    from optimizer.experiments.article import ArticleEvaluator


def _atomic_figure(figure, path: Path) -> Path:
    return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _cell(row, column: str) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column == "label" or isinstance(value, str):
        return str(value)
    digits = 2 if column == "clip_score" else 1 if column == "fid" else 0 if column == "unet_evals_per_image" else 3
    ci = row.get(f"{column}_ci95")
    text = f"{value:.{digits}f}"
    if ci is not None and not (isinstance(ci, float) and math.isnan(ci)) and column != "unet_evals_per_image":
        text += f" ± {ci:.{digits}f}"
    return text


def markdown_table(summary) -> str:
    """The experiment table as Markdown: label, oracle digit/fg/bg/all, zoo CLIP, FID (InceptionV3 against
    real renders of the same captions; biased upwards at 100 images, compare rows only), UNet evaluations
    per image, seeds; ``mean ± 95% half-width`` where rows were averaged over search seeds."""
    header = ["label", "digit", "fg", "bg", "all five", "zoo CLIP", "FID", "UNet evals / image", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for _, row in summary.iterrows():
        cells = [_cell(row, c) for c in TABLE] + [str(int(row.get("n", 1)))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pareto_table(pareto) -> str:
    """The Pareto front as Markdown: trial, search CLIP and KID, held-out oracle and CLIP (when evaluated)."""
    columns = [("trial", "trial", "{:d}"), ("search_clip", "search CLIP", "{:.2f}"), ("search_kid", "search KID", "{:.4f}"),
               ("oracle_digit", "digit", "{:.3f}"), ("oracle_fg", "fg", "{:.3f}"), ("oracle_bg", "bg", "{:.3f}"),
               ("oracle_all", "all five", "{:.3f}"), ("clip_score", "zoo CLIP", "{:.2f}")]
    columns = [c for c in columns if c[0] in pareto.columns]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---:|" * len(columns)]
    for _, row in pareto.iterrows():
        lines.append("| " + " | ".join(fmt.format(int(row[key]) if fmt == "{:d}" else float(row[key])) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def _plot_sweeps(summary, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    styles = {"merge": ("merge shape+colour (Checkpoint Merger)", "C0", "o"), "ensemble": ("ensemble shape+colour (output weights)", "C1", "s"),
              "control": ("control: merge base+other_init", "C3", "^")}
    for ax, metric, title in zip(axes, ("oracle_all", "clip_score"), ("oracle: all five attributes", "zoo CLIP score"), strict=True):
        for group, (name, colour, marker) in styles.items():
            rows = summary[summary["group"] == group].sort_values("alpha")
            if len(rows):
                ax.plot(rows["alpha"], rows[metric], marker=marker, color=colour, label=name)
        for parent, colour in (("shape", "C4"), ("colour", "C2"), ("base", "0.5")):
            match = summary[summary["label"] == parent]
            if len(match):
                ax.axhline(float(match[metric].iloc[0]), color=colour, linestyle=":", linewidth=1, label=f"{parent} alone")
        ax.axvline(ARTICLE_ALPHA, color="0.7", linewidth=0.8)
        ax.set_xlabel("alpha (weight of B: colour, resp. other_init)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    figure.suptitle("Weighted-sum and ensemble sweeps (held-out captions); grey line: the article's 0.6/0.4")
    return _atomic_figure(figure, path)


def _plot_histories(histories, path: Path) -> Path:
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(histories["study"]))
    figure = Figure(figsize=(3.2 * max(len(keys), 1), 3.2))
    axes = figure.subplots(1, max(len(keys), 1), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=False):
        rows = histories[histories["study"] == key]
        for seed, run in rows.groupby("search_seed"):
            ax.plot(run["trial"], run["best"], drawstyle="steps-post", label=f"seed {seed}")
            ax.scatter(run["trial"], run["value"], s=6, alpha=0.4)
        ax.set_title(key)
        ax.set_xlabel("trial")
    axes[0].set_ylabel("zoo CLIP on search prompts (best so far)")
    axes[0].legend(fontsize=7)
    return _atomic_figure(figure, path)


def _plot_blocks(recipes, blocks: Sequence[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    per_block = recipes[recipes["study"] != "global-tpe"] if len(recipes) else recipes
    keys = list(dict.fromkeys(per_block["study"])) if len(per_block) else []
    figure = Figure(figsize=(11, 2.6 * max(len(keys), 1)))
    axes = figure.subplots(max(len(keys), 1), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys, strict=False):
        for _, row in per_block[per_block["study"] == key].iterrows():
            ax.plot(range(len(blocks)), [row[b] for b in blocks], marker="o", markersize=3,
                    label=f"seed {int(row['search_seed'])} (search CLIP {row['search_score']:.1f})")
        ax.axhline(0.5, color="0.7", linewidth=0.8)
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("alpha (B's weight)")
        ax.set_title(f"best 26-block recipe: {key}")
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels(blocks, rotation=90, fontsize=7)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return _atomic_figure(figure, path)


def _plot_pareto(pareto, everything, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 4))
    ax = figure.subplots()
    ax.scatter(everything["kid"], everything["clip"], s=10, color="0.6", label="trials")
    front = pareto.sort_values("search_kid")
    ax.plot(front["search_kid"], front["search_clip"], marker="o", color="C3", label="Pareto front")
    ax.set_xlabel("KID vs real renders (zoo-CLIP features, lower is better)")
    ax.set_ylabel("zoo CLIP on search prompts")
    ax.legend(fontsize=7)
    ax.set_title("NSGA-II: prompt following vs realism")
    return _atomic_figure(figure, path)


def _plot_grid(evaluator: ArticleEvaluator, candidates: Sequence[Candidate], path: Path, *, images: int = 8) -> Path:
    from matplotlib.figure import Figure

    from optimizer.render.grid import grid_image

    figure = Figure(figsize=(1.1 * images + 2.5, 1.05 * len(candidates) + 0.6))
    axes = figure.subplots(len(candidates), 1, squeeze=False)[:, 0]
    tile = 32 + 2  # grid_image: 32-pixel tiles, 2-pixel padding
    for ax, candidate in zip(axes, candidates, strict=True):
        ax.imshow(grid_image(evaluator.images(candidate, count=images), nrow=images))
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(candidate.label.replace("shape+colour ", "").replace(" ", "\n", 1), rotation=0, ha="right", va="center", fontsize=8)
    captions = []
    for sample in evaluator.evaluation.samples[:images]:
        a = sample.attributes
        captions.append(f"{a.digit} {a.fg}\non {a.bg}\n{a.thickness}\n{a.slant}")
    axes[-1].set_xticks([2 + i * tile + 16 for i in range(len(captions))])
    axes[-1].set_xticklabels(captions, fontsize=6)
    figure.suptitle("First held-out captions, same seeds, side by side", fontsize=9)
    return _atomic_figure(figure, path)


