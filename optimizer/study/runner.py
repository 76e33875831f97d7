"""Running a study: build the heavy things once, then per trial recipe -> merge -> render -> score.

:class:`StudyRunner` loads the parents into the merge kernel, binds one pipeline to the kernel's
output buffer, loads the prompt set and builds the objectives, once. Calling it with a trial:

1. ``suggest_recipe(trial, space)`` (a pure function of the trial);
2. ``technique.prepare(recipe)`` (:mod:`optimizer.study.techniques`): the pipeline now renders the
   candidate (no copy, no disk);
3. the search prompts are rendered batch by batch; each batch updates every objective; for a
   single-objective study the running score is reported after each batch so the pruner can stop a
   bad candidate early;
4. the score (weighted sum, maximized) or the objective tuple (Pareto) is returned; the recipe,
   each objective's value, timings and the image grid (an Optuna artifact) are recorded.

Held-out prompts are never rendered here; :meth:`StudyRunner.evaluate` renders them on request
(choosing among Pareto trials, reports).

A trial whose images are NaN, that runs out of memory, or whose scorer fails
(:data:`TRIAL_ERRORS`) is marked FAIL with the reason (user attribute ``failure``); whether the
study goes on is the loop's decision (:mod:`optimizer.study.loop`). Ctrl-C inside a trial fails
it and re-queues it (:mod:`optimizer.study.interrupts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch

from objectives.base import Objective, ObjectiveError
from objectives.combine import combine_scores
from optimizer.adapters.lbw import parse_lbw
from optimizer.errors import EvomergeError
from optimizer.merge import MergeRecipe
from optimizer.render.grid import grid_png
from optimizer.render.prompts import Split, load_prompt_set
from optimizer.render.renderer import Renderer
from optimizer.study.config import StudyConfig, StudyConfigError
from optimizer.study.interrupts import INTERRUPTED, CtrlC, TrialInterrupted, requeue
from optimizer.study.space import BoundSpace, bind_space, inert_dimensions, pin_dimensions, suggest_recipe
from optimizer.study.storage import StudyFolder
from optimizer.study.techniques import Technique, build_technique, study_loras, study_parents

__all__ = ["TRIAL_ERRORS", "StudyRunner", "lora_null_blocks"]

#: exceptions that fail one trial (recorded) instead of stopping the study: our own errors (a
#: merge that cannot be made, NaN images, a scorer that cannot score) and running out of memory.
#: Anything else is a bug and stops the study with its traceback.
TRIAL_ERRORS: tuple[type[BaseException], ...] = (EvomergeError, torch.OutOfMemoryError)


def lora_null_blocks(lora) -> list[str]:
    """The blocks in which every layer of ``lora`` adds nothing (a zero factor or scale)."""
    live = {layer.block for layer in lora.layers if layer.scale != 0 and bool(layer.up.any()) and bool(layer.down.any())}
    return [b for b in lora.blocks if b not in live]


class StudyRunner:
    """Everything a trial needs, built once (see the module docstring)."""

    def __init__(self, config: StudyConfig, *, folder: StudyFolder) -> None:
        from objectives.build import build_objectives

        self.config = config
        self.folder = folder
        started = time.perf_counter()
        self.parents = study_parents(config)
        layout = self.parents.bank.layout
        if config.architecture not in ("auto", layout.name):
            raise StudyConfigError(f"architecture: the study says {config.architecture}, the parents are {layout.name}")
        self.loras = study_loras(config, self.parents)
        lbw = [parse_lbw(c.lbw, layout=layout, touched=l.blocks) if c.lbw else None for c, l in zip(config.loras, self.loras, strict=True)]
        self.space: BoundSpace = bind_space(
            config.search_space, layout=layout, method=config.method, n_parents=self.parents.bank.n_parents,
            seed=config.seed, merge_vae=config.merge_vae,
            loras=[(c.resolved_name, c.strength, l.blocks, f) for c, l, f in zip(config.loras, self.loras, lbw, strict=True)],
            hypernetworks=[(h.resolved_name, h.strength) for h in config.hypernetworks],
        )
        self.notes: list[str] = []  # what the set-up found and the user should know (printed by the CLI)
        self.prompt_set = load_prompt_set(config.prompts)
        self.technique: Technique = build_technique(config, parents=self.parents, loras=self.loras,
                                                    search_prompts=[p.prompt for p in self.prompt_set.prompts("search")])
        self._pin_inert_dimensions()
        self.renderer = Renderer(self.technique.pipe, prompt_set=self.prompt_set, batch_size=config.render.batch_size)
        device = str(self.parents.bank.device)
        self.objectives: list[Objective] = build_objectives(config.objective_specs, device=device)
        self.weights = [o.weight for o in config.objectives]
        self.directions = [o.resolved_direction for o in config.objectives]
        #: how several values become one score (run_study may restore a stored rule) and the calibration scores
        self.normalise, self.mean = config.normalisation, config.combined_mean
        self.calibration = None
        self.ctrl_c = CtrlC()
        self.on_note: Callable[[str], None] | None = None  # told about flagged trials (the CLI prints them)
        self._last_images: tuple[int, str, str] | None = None
        self.setup_seconds = time.perf_counter() - started

    def _pin_inert_dimensions(self) -> None:
        """Take out of the search what cannot change the weights, and say so (a study of identical
        parents, or of a block equal in all of them, would search nothing and report noise).
        :func:`~optimizer.study.loop.run_study` refuses a study whose every searched value was pinned; a runner built
        only to evaluate fixed recipes (a single model as identical parents) is fine."""
        inert: dict[str, str] = {}
        if self.technique.searches_weights:  # an ensemble's weight mixes predictions, not weights
            equal = self.parents.bank.equal_segments(names=self.space.layout.blocks)
            null = {lora.name: lora_null_blocks(lora) for lora in self.loras}
            inert = inert_dimensions(self.space, equal_blocks=equal, lora_null_blocks=null)
        for name, reason in inert.items():
            self.notes.append(f"{name} is not searched: {reason}, so its value cannot change the weights")
        for lora in self.loras:
            if not lora.blocks:
                self.notes.append(f"LoRA {lora.name!r} touches no block of the model: its strength is not searched")
        self.space = pin_dimensions(self.space, list(inert))
        self.pinned = inert

    def _flag_unchanged_images(self, trial: optuna.Trial, *, recipe: MergeRecipe, digest: str) -> None:
        """Flag a trial whose images are bit for bit the previous trial's while its recipe differs:
        the recipe's differences did not reach the renderer (user attribute ``warning``)."""
        key = json.dumps(recipe.model_dump(mode="json"), sort_keys=True)
        last, self._last_images = self._last_images, (trial.number, digest, key)
        if last is not None and last[1] == digest and last[2] != key:
            text = f"trial {trial.number}: images identical to trial {last[0]}'s although the recipe differs"
            trial.set_user_attr("warning", text)
            if self.on_note is not None:
                self.on_note(text)

    @property
    def artifact_store(self):
        """The study folder's artifact store (created on first use: building a runner writes nothing)."""
        from optuna.artifacts import FileSystemArtifactStore

        self.folder.artifacts.mkdir(parents=True, exist_ok=True)
        return FileSystemArtifactStore(str(self.folder.artifacts))

    # ------------------------------------------------------------------ scoring
    def _combine(self, values: Sequence[float]) -> float:
        """The weighted study's score of ``values`` (see :mod:`objectives.combine`)."""
        anchors = None
        if self.normalise == "calibration":
            if self.calibration is None:
                from optimizer.study.calibration import runner_calibration

                self.calibration = runner_calibration(self)
            anchors = [{"noise": c.noise, "parents": c.parents} for c in self.calibration]
        return combine_scores(values, weights=self.weights, directions=self.directions, mean=self.mean, anchors=anchors,
                              names=[o.name for o in self.objectives])

    def _render_and_score(self, split: Split, trial: optuna.Trial | None = None) -> tuple[list[float], dict[str, Any]]:
        jobs = self.prompt_set.jobs(split)
        for objective in self.objectives:
            objective.reset()
        render_s = score_s = 0.0
        digest = hashlib.sha256()
        grid_images: list[torch.Tensor] = []
        want = self.config.render.grid_images
        prune = trial is not None and self.config.mode == "weighted" and self.config.pruner.name != "none"
        done = 0
        for batch in self.renderer.batches(jobs):
            render_s += batch.seconds
            started = time.perf_counter()
            digest.update(batch.images.detach().float().cpu().numpy().tobytes())
            prompts = [j.prompt for j in batch.jobs]
            for objective in self.objectives:
                objective.update(batch.images, prompts=prompts)
            done += len(batch.jobs)
            if len(grid_images) < want:
                grid_images.append(batch.images[: want - sum(len(g) for g in grid_images)].cpu())
            if prune and done < len(jobs):
                try:
                    partial = self._combine([o.compute() for o in self.objectives])
                except ObjectiveError:
                    partial = None  # e.g. FID needs two images
                if partial is not None:
                    trial.report(partial, step=done)
                    if trial.should_prune():
                        score_s += time.perf_counter() - started
                        trial.set_user_attr("seconds", {"render": render_s, "score": score_s})
                        raise optuna.TrialPruned(f"pruned after {done} of {len(jobs)} images (running score {partial:.4f})")
            score_s += time.perf_counter() - started
        started = time.perf_counter()
        values = [o.compute() for o in self.objectives]
        score_s += time.perf_counter() - started
        info = {"render": render_s, "score": score_s, "images": len(jobs), "grid": torch.cat(grid_images) if grid_images else None,
                "prompts": [j.prompt for j in jobs[: want]], "digest": digest.hexdigest()}
        return values, info

    def _upload_grid(self, trial: optuna.Trial, images: torch.Tensor, prompts: list[str]) -> None:
        from optuna.artifacts import upload_artifact

        data = grid_png(images, labels=None)
        fd, tmp = tempfile.mkstemp(prefix=f"trial-{trial.number}-", suffix=".png")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            artifact_id = upload_artifact(artifact_store=self.artifact_store, file_path=tmp, study_or_trial=trial, mimetype="image/png")
        finally:
            Path(tmp).unlink(missing_ok=True)
        trial.set_user_attr("grid_artifact", artifact_id)
        trial.set_user_attr("grid_prompts", prompts)

    def prepare(self, recipe: MergeRecipe) -> dict[str, float]:
        """Make the pipeline render ``recipe`` (the technique's steps, see
        :mod:`optimizer.study.techniques`). Returns seconds per step."""
        return self.technique.prepare(recipe)

    @property
    def worker(self) -> dict[str, Any]:
        """Which process ran a trial: host, pid, device and torch's CPU thread count."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.parents.bank.device),
                "threads": torch.get_num_threads()}

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        started = time.perf_counter()
        recipe = suggest_recipe(trial, self.space)
        trial.set_user_attr("recipe", recipe.model_dump(mode="json"))
        trial.set_user_attr("mbw", {p: recipe.to_mbw(layout=self.space.layout, param=p) for p in recipe.params})
        try:
            with self.ctrl_c.interruptible():
                prepared = self.prepare(recipe)
                values, info = self._render_and_score("search", trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            self.ctrl_c.requested = True
            trial.set_user_attr("failure", INTERRUPTED)
            requeue(trial)
            raise TrialInterrupted(INTERRUPTED) from None
        except TRIAL_ERRORS as exc:
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}")
            raise
        names = [o.name for o in self.objectives]
        trial.set_user_attr("values", dict(zip(names, values, strict=True)))
        trial.set_user_attr(
            "seconds", {**prepared, "render": info["render"], "score": info["score"], "total": time.perf_counter() - started}
        )
        trial.set_user_attr("images", info["images"])
        trial.set_user_attr("worker", self.worker)
        self._flag_unchanged_images(trial, recipe=recipe, digest=info["digest"])
        if info["grid"] is not None:
            self._upload_grid(trial, info["grid"], info["prompts"])
        if self.config.mode == "pareto":
            return tuple(values)
        return self._combine(values)

    def evaluate(self, recipe: MergeRecipe, *, split: Split = "held_out") -> dict[str, float]:
        """Objective values of ``recipe`` on ``split`` (held-out prompts by default), plus ``score``."""
        if not self.prompt_set.prompts(split):
            raise StudyConfigError(f"prompts: the prompt set has no {split} prompts")
        self.prepare(recipe)
        values, _ = self._render_and_score(split)
        out = {o.name: v for o, v in zip(self.objectives, values, strict=True)}
        out["score"] = self._combine(values)
        return out
