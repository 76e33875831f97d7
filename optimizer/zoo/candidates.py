"""Evaluating fixed candidates on the zoo's held-out captions: one row of an experiment table each.

A :class:`Candidate` names what renders: two zoo parents (or one, merged with itself), a global
alpha or an MBW string, the technique (weight merge or output ensemble), LoRAs and hypernetworks at
fixed strengths, and whether the norms are recalibrated after the merge. :class:`CandidateEvaluator`
builds the scorers once (zoo oracle, zoo CLIP), then for each candidate builds the same
:class:`~optimizer.study.runner.StudyRunner` a study would (so experiments exercise the study code
path), prepares the recipe, samples one image per held-out caption with a fixed seed, and returns
the oracle accuracies, the CLIP score, (with ``fid=True``) FID InceptionV3 against real renders of
the same captions, UNet evaluations per image and seconds per image.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from optimizer.study.config import parse_study_config
from optimizer.study.runner import StudyRunner
from optimizer.study.space import suggest_recipe
from optimizer.study.storage import StudyFolder
from optimizer.zoo import paths

__all__ = ["Candidate", "CandidateEvaluator"]

PROMPTS = Path(__file__).resolve().parents[2] / "studies" / "prompts" / "zoo-digits.yaml"


@dataclass(frozen=True)
class Candidate:
    """One experiment row. ``parents``: zoo model names or checkpoint paths (one parent = itself);
    ``alpha``: the weight of the second parent, a number or an MBW string; ``loras`` /
    ``hypernetworks``: ``(path, strength)`` pairs."""

    label: str
    parents: tuple[str, ...]
    alpha: float | str = 0.0
    technique: str = "merge"
    loras: tuple[tuple[str, float], ...] = ()
    hypernetworks: tuple[tuple[str, float], ...] = ()
    recalibrate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # copied into the result row


def _parent_path(zoo: Path, name: str) -> str:
    path = Path(name)
    return str(path) if path.suffix else str(paths.model_file(zoo, name))


class CandidateEvaluator:
    """Scores candidates on ``count`` held-out captions (see the module docstring)."""

    def __init__(
        self, *, zoo: Path | None = None, count: int = 100, steps: int = 20, guidance: float = 4.0, seed: int = 7, fid: bool = False
    ) -> None:
        from optimizer.zoo.build import quality_meter
        from optimizer.zoo.quality import evaluation_set

        self.zoo = Path(zoo or paths.default_zoo_dir())
        self.evaluation = evaluation_set(count=count, seed=seed)
        self.meter = quality_meter(self.zoo, self.evaluation)
        self.steps, self.guidance = steps, guidance
        self.fid = fid

    def runner(self, candidate: Candidate, *, folder: Path) -> tuple[StudyRunner, Any]:
        """The study runner of ``candidate`` and its recipe (everything pinned but alpha)."""
        parents = [_parent_path(self.zoo, p) for p in candidate.parents]
        if len(parents) == 1:
            parents = parents * 2
        per_block = isinstance(candidate.alpha, str)
        data: dict[str, Any] = {
            "name": "candidate",
            "parents": parents,
            "technique": candidate.technique,
            "search_space": {"alpha": {"share": "per_block" if per_block else "global"}},
            "loras": [{"path": p, "strength": s} for p, s in candidate.loras],
            "hypernetworks": [{"path": p, "strength": s} for p, s in candidate.hypernetworks],
            "objectives": ["clip"],
            "scorers": {"clip_model": "evomerge-digits-clip", "clip_weights": str(paths.clip_file(self.zoo))},  # the zoo's CLIP, named
            "prompts": str(PROMPTS),
            "budget": {"trials": 1},
            "render": {"grid_images": 0},
        }
        if candidate.recalibrate:
            data["recalibrate"] = {}
        config = parse_study_config(data, source=f"candidate {candidate.label!r}")
        runner = StudyRunner(config, folder=StudyFolder(folder))
        if per_block:
            from optimizer.architectures.mbw import parse_mbw

            values = parse_mbw(candidate.alpha, layout=runner.space.layout)
            fixed = {f"alpha.{b}": v for b, v in values.items()}
        else:
            fixed = {"alpha": float(candidate.alpha)}
        return runner, suggest_recipe(optuna.trial.FixedTrial(fixed), runner.space)

    def evaluate(self, candidate: Candidate) -> dict[str, Any]:
        """Figures of one candidate (see the module docstring)."""
        from optimizer.zoo.models import generate

        with tempfile.TemporaryDirectory() as scratch:
            runner, recipe = self.runner(candidate, folder=Path(scratch))
            prepared = runner.prepare(recipe)
            pipe = runner.renderer.pipe
            started = time.perf_counter()
            images = generate(pipe, prompts=self.evaluation.captions, seeds=self.evaluation.seeds, steps=self.steps, guidance=self.guidance)
            seconds = time.perf_counter() - started
            members = runner.technique.evaluations_per_step
        figures = self.meter.score(images, fid=self.fid)
        return {
            "label": candidate.label,
            **candidate.extra,
            **figures,
            "unet_evals_per_image": members * self.steps,
            "seconds_per_image": seconds / len(images),
            "prepare_seconds": sum(prepared.values()),
            **{f"{k}_seconds": v for k, v in prepared.items()},
        }

    def evaluate_all(self, candidates: Sequence[Candidate], *, progress: bool = True):
        """A pandas DataFrame, one row per candidate, in order."""
        import pandas as pd

        rows = []
        for candidate in candidates:
            rows.append(self.evaluate(candidate))
            if progress:
                row = rows[-1]
                print(f"  {candidate.label}: digit {row['oracle_digit']:.3f} fg {row['oracle_fg']:.3f} all {row['oracle_all']:.3f} "
                      f"clip {row['clip_score']:.2f}", flush=True)
        return pd.DataFrame(rows)

