"""``evomerge report``: a study's trials as a table and figures, written to ``<study>/report/``.

* ``trials.csv`` / ``trials.md``: one row per trial (pandas): number, state, score or objective
  values, each objective's value, timings (merge / render / score seconds), the searched
  parameters, the failure or pruning reason.
* ``history.png``: Optuna's optimization history (single objective) or Pareto front (several).
* ``importances.png``: Optuna's parameter importances (fANOVA), once enough trials are complete.
* ``block_weights.png``: the per-block curve (BASE, IN00..IN11, M00, OUT00..OUT11 for SD1.x) of
  each merge parameter for the best trials: what a person would type into an MBW slider.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import optuna

from optimizer.architectures.layout import load_layout
from optimizer.atomic import write_atomic

__all__ = ["trials_table", "write_report"]

TOP = 5


def trials_table(study: optuna.Study):
    """The trials as a pandas DataFrame (see the module docstring)."""
    import pandas as pd

    rows: list[dict[str, Any]] = []
    multi = len(study.directions) > 1
    trials = study.get_trials(deepcopy=False)
    retried_as = {t.system_attrs["failed_trial"]: t.number for t in trials if "failed_trial" in t.system_attrs}
    pruned = optuna.trial.TrialState.PRUNED
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        if multi:
            names = study.metric_names or [f"value{i}" for i in range(len(study.directions))]
            for name, value in zip(names, t.values or [None] * len(names), strict=True):
                row[name] = value
        else:
            # a pruned trial's value is Optuna's copy of its last running score over part of the
            # prompts: not comparable with the scores of complete trials, so it is not shown as one
            row["score"] = None if t.state == pruned else t.value
            for name, value in t.user_attrs.get("values", {}).items():
                row[name] = value
        for part, seconds in t.user_attrs.get("seconds", {}).items():
            row[f"{part}_s"] = seconds
        row.update(t.params)
        row["note"] = _note(t, retried_as=retried_as.get(t.number))
        rows.append(row)
    return pd.DataFrame(rows)


def _note(trial: optuna.trial.FrozenTrial, *, retried_as: int | None) -> str:
    """Why a trial failed or was pruned, and which trial retried it."""
    reason = trial.user_attrs.get("failure") or trial.system_attrs.get("fail_reason")
    if trial.state == optuna.trial.TrialState.PRUNED:
        reason = reason or f"pruned at {trial.last_step} images"
        if trial.last_step is not None and trial.last_step in trial.intermediate_values:
            reason += f" (running score {trial.intermediate_values[trial.last_step]:.4g} over those images)"
    elif trial.state == optuna.trial.TrialState.FAIL and not reason:
        reason = "its process stopped (killed or crashed): no heartbeat within the grace period" if retried_as is not None else "unknown"
    if retried_as is not None and "re-queued" not in (reason or ""):
        reason = f"{reason}; retried as trial {retried_as}"
    warning = trial.user_attrs.get("warning")
    if warning:
        reason = f"{reason}; {warning}" if reason else warning
    return reason or ""


def _save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    finally:
        plt.close(figure)


def _best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(study.directions) > 1:
        return list(study.best_trials)[:TOP]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: t.value, reverse=reverse)[:TOP]


def _block_curve(study: optuna.Study, architecture: str):
    import matplotlib.pyplot as plt

    layout = load_layout(architecture)
    best = [t for t in _best_trials(study) if "recipe" in t.user_attrs]
    params = sorted({p for t in best for p in t.user_attrs["recipe"]["params"]})
    figure, axes = plt.subplots(len(params), 1, figsize=(11, 3.2 * len(params)), squeeze=False)
    x = list(range(len(layout.blocks)))
    for ax, param in zip(axes[:, 0], params, strict=True):
        for t in best:
            values = t.user_attrs["recipe"]["params"][param]
            label = f"trial {t.number}" + (f" ({t.value:.3f})" if t.values and len(t.values) == 1 else "")
            ax.plot(x, [values[b] for b in layout.blocks], marker="o", ms=3, label=label)
        ax.set_xticks(x, layout.blocks, rotation=90, fontsize=7)
        ax.set_ylabel(param)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0, 0].set_title(f"{study.study_name}: per-block {', '.join(params)} of the best trials")
    return figure


def calibration_markdown(study: optuna.Study) -> str:
    """The sanity gate's calibration scores and margins, and the combination rule ("" if none stored)."""
    rows = study.user_attrs.get("calibration")
    rule = study.user_attrs.get("combine")
    if not rows and not rule:
        return ""
    lines = ["# Calibration", ""]
    if rule:
        lines += [f"Score combination: normalise **{rule['normalise']}**, mean **{rule['mean']}** (see objectives/combine.py).", ""]
    if rows:
        lines += ["Each objective on the parents' own renders, on the same renders with shuffled captions, and on noise and flat",
                  "images. Margin = how much better the parents' renders score (signed by direction); the gate needs every margin > 0.", "",
                  "| objective | direction | parents | shuffled | noise | flat | margin shuffled | margin noise | margin flat |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r.get("margins", {})
            cell = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
            lines.append(f"| {r['name']} | {r['direction']} | {cell(r['parents'])} | {cell(r['shuffled'])} | {cell(r['noise'])} | {cell(r['flat'])} "
                         f"| {cell(m.get('shuffled'))} | {cell(m.get('noise'))} | {cell(m.get('flat'))} |")
    return "\n".join(lines) + "\n"


def write_report(study: optuna.Study, *, folder: str | os.PathLike[str], architecture: str) -> dict[str, Path]:
    """Write the report files into ``folder`` and return them by name."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    written: dict[str, Path] = {}
    written["csv"] = write_atomic(out / "trials.csv", lambda tmp: table.to_csv(tmp, index=False))
    shown = table.drop(columns=[c for c in table.columns if "." in c], errors="ignore")
    written["markdown"] = write_atomic(out / "trials.md", lambda tmp: Path(tmp).write_text(shown.to_markdown(index=False, floatfmt=".4g") + "\n"))
    calibration = calibration_markdown(study)
    if calibration:
        written["calibration"] = write_atomic(out / "calibration.md", lambda tmp: Path(tmp).write_text(calibration))
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are "experimental"
        if len(study.directions) == 1:
            ax = ovm.plot_optimization_history(study)
        else:
            ax = ovm.plot_pareto_front(study, target_names=study.metric_names)
        written["history"] = _save_figure(ax.figure, out / "history.png")
        if len(complete) >= 3 and len(study.directions) == 1:
            ax = ovm.plot_param_importances(study)
            written["importances"] = _save_figure(ax.figure, out / "importances.png")
    written["block_weights"] = _save_figure(_block_curve(study, architecture), out / "block_weights.png")
    return written
