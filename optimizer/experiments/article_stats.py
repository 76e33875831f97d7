"""The article's statistics: means with Student-t intervals over search seeds, and the claims' verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optimizer.experiments.article_settings import ARTICLE_ALPHA, CONTROL, PAIR, STUDIES, Z95, _num


def summarize(frame, *, by: str = "label", metrics: Sequence[str] | None = None):
    """One row per ``by`` value (first-appearance order): mean and 95% t-interval over its rows.

    For a group of ``n`` rows with values ``x_1..x_n`` of a metric: ``mean = sum(x) / n``,
    ``s = sqrt(sum((x - mean)^2) / (n - 1))``, and the half-width of the 95% interval
    ``<metric>_ci95 = t_{0.975, n-1} * s / sqrt(n)`` (Student's t, ``scipy.stats.t``), so the
    interval is ``mean +- <metric>_ci95``; ``n = 1`` keeps its value with ``_ci95`` NaN. Column
    ``n`` counts the rows (search seeds). ``metrics``: the numeric columns to summarize (default:
    every numeric column but ``search_seed``); other columns keep their value when it is the same
    in the whole group, else missing (None, or NaN in a string column)."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    if by not in frame.columns:
        raise ValueError(f"no column {by!r} to group by")
    if metrics is None:
        metrics = [c for c in frame.columns if c not in (by, "search_seed") and pd.api.types.is_numeric_dtype(frame[c])
                   and not pd.api.types.is_bool_dtype(frame[c])]
    metrics = list(metrics)
    rows = []
    for key, group in frame.groupby(by, sort=False):
        row: dict[str, Any] = {by: key, "n": len(group)}
        for column in frame.columns:
            if column == by or column in metrics:
                continue
            values = group[column].tolist()
            same = all(v == values[0] or (isinstance(v, float) and isinstance(values[0], float) and math.isnan(v) and math.isnan(values[0]))
                       for v in values)
            row[column] = values[0] if same else None
        for column in metrics:
            values = group[column].dropna().to_numpy(dtype=float)
            n = len(values)
            row[column] = float(values.mean()) if n else math.nan
            if n >= 2:
                row[f"{column}_ci95"] = float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n))
            else:
                row[f"{column}_ci95"] = math.nan
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Claim:
    """One comparison on ``oracle_all``: ``value`` (the candidate) vs ``reference``; ``low``/``high``:
    the 95% interval of ``value - reference``; ``verdict``: holds / does not hold / not shown."""

    claim: str
    candidate: str
    reference: str
    value: float
    reference_value: float
    low: float
    high: float
    clip: float
    reference_clip: float
    verdict: str

    @property
    def text(self) -> str:
        return (f"**{self.claim}** — {self.candidate} vs {self.reference}: oracle_all {self.value:.3f} vs {self.reference_value:.3f} "
                f"(difference {self.value - self.reference_value:+.3f}, 95% interval [{self.low:+.3f}, {self.high:+.3f}]; "
                f"zoo CLIP {self.clip:.2f} vs {self.reference_clip:.2f}) → **{self.verdict}**")


def _se(row) -> float:
    """Standard error of a row's ``oracle_all``: binomial over its ``m`` evaluation images with the
    Agresti-Caffo adjustment (one success and one failure added: ``p~ = (p m + 1) / (m + 2)``,
    ``var = p~ (1 - p~) / (m + 2)``, so a row at 0 or 1 still has a width), plus, for rows averaged
    over ``n >= 2`` search seeds, the seeds' ``s^2 / n`` (from the t half-width:
    ``s / sqrt(n) = ci95 / t_{0.975, n-1}``)."""
    from scipy import stats

    p, images = float(row["oracle_all"]), float(row.get("images", math.nan))
    variance = 0.0
    if images and not math.isnan(images):
        adjusted = (p * images + 1) / (images + 2)
        variance = adjusted * (1 - adjusted) / (images + 2)
    n = int(row.get("n", 1) or 1)
    ci = row.get("oracle_all_ci95", math.nan)
    if n >= 2 and ci is not None and not math.isnan(ci):
        variance += (ci / stats.t.ppf(0.975, n - 1)) ** 2
    return math.sqrt(variance)


def _compare(summary, claim: str, candidate: str, reference: str) -> Claim | None:
    rows = summary.set_index("label")
    if candidate not in rows.index or reference not in rows.index:
        return None
    a, b = rows.loc[candidate], rows.loc[reference]
    diff = float(a["oracle_all"]) - float(b["oracle_all"])
    half = Z95 * math.hypot(_se(a), _se(b))
    low, high = diff - half, diff + half
    verdict = "holds" if low > 0 else "does not hold (worse)" if high < 0 else "not shown (difference within noise)"
    return Claim(claim=claim, candidate=candidate, reference=reference, value=float(a["oracle_all"]), reference_value=float(b["oracle_all"]),
                 low=low, high=high, clip=float(a["clip_score"]), reference_clip=float(b["clip_score"]), verdict=verdict)


def _better(summary, names: Sequence[str]) -> str:
    rows = summary.set_index("label")
    return max(names, key=lambda n: float(rows.loc[n, "oracle_all"]))


def claims(summary) -> list[Claim]:
    """The article's claims checked on ``summary`` (:func:`summarize` of the rows), on ``oracle_all``.

    The difference of two rows has the 95% interval ``d +- 1.96 sqrt(se_a^2 + se_b^2)`` (normal
    approximation; ``se`` per row as in :func:`_se`: binomial over the evaluation images, plus the
    spread over search seeds; the rows share their evaluation images, so this unpaired interval is
    conservative). Verdict: holds (interval above 0), does not hold
    (below 0), not shown (contains 0). Claims: (1) Checkpoint Merger 0.5 of shape+colour vs the
    better parent, and the sweep's best alpha (chosen on the evaluation set: optimistic); (2) the
    ensemble 0.6/0.4 vs the better parent, and vs the merge 0.5; the negative control's merge 0.5
    vs the better of base/other_init; each optimized study (mean over seeds) vs the merge 0.5."""
    out: list[Claim | None] = []
    labels = set(summary["label"])
    better = _better(summary, PAIR) if set(PAIR) <= labels else PAIR[0]
    merge = "merge shape+colour 0.5"
    out.append(_compare(summary, "(1) Checkpoint Merger 50/50 of two similar models improves on the better parent", merge, better))
    inner = summary.iloc[0:0]
    if "group" in summary.columns and "alpha" in summary.columns:
        inner = summary[(summary["group"] == "merge") & (summary["alpha"] > 0) & (summary["alpha"] < 1)]
    if len(inner):
        best = inner.loc[inner["oracle_all"].idxmax(), "label"]
        out.append(_compare(summary, "(1') Checkpoint Merger at the sweep's best alpha (picked on these images) improves on the better parent",
                            best, better))
    ensemble = f"ensemble shape+colour {_num(1 - ARTICLE_ALPHA)}/{_num(ARTICLE_ALPHA)}"
    out.append(_compare(summary, "(2) the article's weight-ratio ensemble 0.6/0.4 improves significantly on the better parent", ensemble, better))
    out.append(_compare(summary, "(2') the ensemble 0.6/0.4 (twice the UNet evaluations) beats the Checkpoint Merger 50/50", ensemble, merge))
    if set(CONTROL) <= labels:
        out.append(_compare(summary, "(control) Checkpoint Merger 50/50 of two models from different initialisations improves on the "
                            "better one (expected not to)", "control base+other_init 0.5", _better(summary, CONTROL)))
    for key in STUDIES:
        label = f"optimized {key}"
        if key == "negative-control":
            if set(CONTROL) <= labels:
                out.append(_compare(summary, "(evomerge) a 26-block search on the negative control beats its better parent", label,
                                    _better(summary, CONTROL)))
        else:
            out.append(_compare(summary, f"(evomerge) the {key} search's best recipe (mean over search seeds) beats the Checkpoint Merger 50/50",
                                label, merge))
    return [c for c in out if c is not None]


