"""The study's calibration set: render the parents once, score the foils, gate, and keep the anchors.

:func:`render_parents` renders each parent as it is (no LoRA, no hypernetwork, no recalibration)
on the first ``calibration.prompts`` search jobs; :func:`settle_calibration` runs at study start:
it scores the calibration set (:mod:`objectives.calibration`), stops a new study whose scorer ranks
noise, flat images or mismatched captions at or above the real renders (``calibration.gate``), and
stores the scores in the study (user attribute ``calibration``) so every later run and worker uses
the same normalisation anchors. The combination rule is stored too (``combine``): a study created
before normalisation existed keeps its raw weighted sum when resumed.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import torch

from objectives.calibration import CalibrationScores, calibrate, gate_failures
from optimizer.errors import EvomergeError

__all__ = ["SanityGateFailed", "render_parents", "runner_calibration", "settle_calibration"]

CALIBRATION_ATTR = "calibration"
COMBINE_ATTR = "combine"


class SanityGateFailed(EvomergeError):
    """A scorer prefers noise, flat images or mismatched captions to the parents' renders."""


def render_parents(runner, *, count: int) -> tuple[torch.Tensor, list[str]]:
    """Each parent's renders of the first ``count`` search jobs, as ``([P * count, 3, H, W], prompts)``."""
    jobs = runner.prompt_set.jobs("search")[:count]
    n = runner.parents.bank.n_parents
    images: list[torch.Tensor] = []
    prompts: list[str] = []
    technique = runner.technique
    if technique.hypernetworks is not None:
        technique.hypernetworks.set_strengths([0.0] * len(technique.hypernetworks))
    with runner.ctrl_c.interruptible():
        for index in range(n):
            technique.show_parent(index)
            for batch in runner.renderer.batches(jobs):
                images.append(batch.images.detach().float().cpu())
                prompts.extend(j.prompt for j in batch.jobs)
    return torch.cat(images), prompts


def runner_calibration(runner) -> list[CalibrationScores]:
    """Render the parents and score the calibration set with the runner's objectives."""
    settings = runner.config.calibration
    images, prompts = render_parents(runner, count=settings.prompts)
    batch = runner.config.render.batch_size if isinstance(runner.config.render.batch_size, int) else 16
    return calibrate(runner.objectives, images=images, prompts=prompts, seed=settings.seed, batch_size=batch)


def settle_calibration(runner, *, study: optuna.Study, new: bool, notify: Callable[[str], None] | None = None) -> None:
    """Fix the runner's combination rule and calibration for ``study`` (see the module docstring).
    Raises :class:`SanityGateFailed` (deleting the study if this call created it) when the gate fails."""
    config = runner.config
    attrs = study.user_attrs
    legacy = not new and COMBINE_ATTR not in attrs
    rule = attrs.get(COMBINE_ATTR) or ({"normalise": "none", "mean": "sum"} if legacy else
                                       {"normalise": runner.normalise, "mean": runner.mean})
    runner.normalise, runner.mean = rule["normalise"], rule["mean"]
    if legacy and notify is not None and config.normalisation != "none":
        notify("this study was created before score normalisation: it keeps its raw weighted sum")
    stored = attrs.get(CALIBRATION_ATTR)
    if stored is not None:
        runner.calibration = [CalibrationScores.from_dict(d) for d in stored]
    elif (config.calibration.gate and not legacy) or runner.normalise == "calibration":
        try:
            scores = runner_calibration(runner)
        except BaseException:  # Ctrl-C or a failing render: a study this call made must not stay behind half set up
            if new:
                _delete(study)
            raise
        failures = gate_failures(scores) if config.calibration.gate and not legacy else []
        if failures:
            if new:
                _delete(study)
            raise SanityGateFailed("sanity gate: " + "; ".join(failures)
                                   + " - check the scorer's weights and options, or set calibration.gate: false")
        runner.calibration = scores
        study.set_user_attr(CALIBRATION_ATTR, [s.as_dict() for s in scores])
    if COMBINE_ATTR not in attrs:
        study.set_user_attr(COMBINE_ATTR, rule)
    if notify is not None and runner.calibration is not None and stored is None:
        for s in runner.calibration:
            margins = ", ".join(f"{k} {v:+.4g}" for k, v in s.margins.items())
            notify(f"calibration: {s.name} parents {s.parents:.4g}; margins over {margins}")


def _delete(study: optuna.Study) -> None:
    """Remove ``study`` from the storage it was made in (external storage outlives the study folder)."""
    optuna.delete_study(study_name=study.study_name, storage=study._storage)  # noqa: SLF001 - the storage the study was made in
