"""Running a study: build the heavy things once, then per trial recipe -> merge -> render -> score.

:class:`StudyRunner` loads the parents into the merge kernel, binds one pipeline to the kernel's
output buffer, loads the prompt set and builds the objectives, once. Calling it with a trial:

1. ``suggest_recipe(trial, space)`` (a pure function of the trial);
2. ``merger.merge(recipe)``: the pipeline now renders the candidate (no copy, no disk);
3. the search prompts are rendered batch by batch; each batch updates every objective; for a
   single-objective study the running score is reported after each batch so the pruner can stop a
   bad candidate early;
4. the score (weighted sum, maximized) or the objective tuple (Pareto) is returned; the recipe,
   each objective's value, timings and the image grid (an Optuna artifact) are recorded.

Held-out prompts are never rendered here; :meth:`StudyRunner.evaluate` renders them on request
(choosing among Pareto trials, reports).

A trial whose images are NaN, that runs out of memory, or whose scorer fails is marked FAIL with
the reason (user attribute ``failure``); the study goes on, unless ``max_consecutive_failures`` trials in a
row fail (then it stops and says why: that is a broken set-up, not a bad recipe).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
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
from optimizer.study.export import PROVENANCE_ATTR, provenance
from optimizer.study.liveness import settle_trials
from optimizer.study.samplers import make_pruner, make_sampler, process_seed
from optimizer.study.space import BoundSpace, bind_space, inert_dimensions, pin_dimensions, suggest_recipe, warm_start_params
from optimizer.study.storage import CONFIG_ATTR, StudyFolder, open_storage
from optimizer.study.techniques import Technique, build_technique, study_loras, study_parents

__all__ = ["StudyFailed", "StudyInterrupted", "StudyRunner", "create_or_load_study", "run_study"]

#: exceptions that fail one trial (recorded) instead of stopping the study: our own errors (a
#: merge that cannot be made, NaN images, a scorer that cannot score) and running out of memory.
#: Anything else is a bug and stops the study with its traceback.
TRIAL_ERRORS: tuple[type[BaseException], ...] = (EvomergeError, torch.OutOfMemoryError)

#: the ``failure`` of a trial stopped by Ctrl-C (it is re-queued with the same parameters)
INTERRUPTED = "interrupted (Ctrl-C / SIGINT); re-queued with the same parameters"


class StudyFailed(EvomergeError, RuntimeError):
    """Too many trials in a row failed: the set-up is broken."""


class TrialInterrupted(EvomergeError):
    """Ctrl-C arrived while a trial merged or rendered: the trial fails (re-queued) and the study stops."""


class CtrlC:
    """SIGINT during a study, handled where it is safe (installed by :func:`run_study` in the main thread).

    Inside :meth:`interruptible` (a trial's merge and render) Ctrl-C raises ``KeyboardInterrupt``
    at once, which the trial turns into :class:`TrialInterrupted`; anywhere else (Optuna writing
    to its storage, the sampler) it only sets :attr:`requested`, and the study stops after the
    current step. Either way nothing is left half-written in the storage."""

    def __init__(self) -> None:
        self.requested = False
        self._inside = False

    def _handler(self, signum, frame) -> None:  # noqa: ANN001 - signal's signature
        self.requested = True
        if self._inside:
            self._inside = False  # a second Ctrl-C while the trial cleans up only sets the flag
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        if self.requested:
            raise KeyboardInterrupt
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[CtrlC]:
        """Handle SIGINT as described while the block runs (only in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class StudyInterrupted(EvomergeError):
    """Ctrl-C stopped the study: the running trial is FAIL with its reason and re-queued; ``study``
    is the Optuna study, so the caller can still write the report."""

    def __init__(self, message: str, *, study: optuna.Study) -> None:
        super().__init__(message)
        self.study = study


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
        :func:`run_study` refuses a study whose every searched value was pinned; a runner built
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


class _Progress:
    """tqdm over finished trials with the best value so far; stops the study after too many failures in a row."""

    def __init__(self, *, total: int | None, initial: int, enabled: bool, max_consecutive_failures: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="trial", dynamic_ncols=True)
        self.failures = 0
        self.max_failures = max_consecutive_failures
        self.last_failure: str | None = None

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        state = trial.state
        if trial.user_attrs.get("failure") == INTERRUPTED:
            study.stop()
            return
        if state == optuna.trial.TrialState.FAIL:
            self.failures += 1
            self.last_failure = trial.user_attrs.get("failure") or trial.system_attrs.get("fail_reason", "unknown")
            if self.failures >= self.max_failures:
                study.stop()
            self.bar.set_postfix_str(f"trial {trial.number} failed: {str(self.last_failure)[:60]}")
            self.bar.write(f"trial {trial.number} failed: {' '.join(str(self.last_failure).split())}", file=sys.stderr)
            return
        self.failures = 0
        self.bar.update(1)
        if len(study.directions) == 1:
            try:
                best = study.best_trial
                self.bar.set_postfix_str(f"best {best.value:.4f} (trial {best.number})")
            except ValueError:
                pass
        else:
            self.bar.set_postfix_str(f"{len(study.best_trials)} Pareto trials")


class _TrialBudget:
    """Callback: after each trial, fail dead trials of any process (see :mod:`optimizer.study.liveness`)
    and stop this process's loop once finished + live trials of all processes reach the budget."""

    def __init__(self, *, trials: int, storage: optuna.storages.RDBStorage, grace: float) -> None:
        self.trials, self.storage, self.grace = trials, storage, grace

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if settle_trials(study, storage=self.storage, grace=self.grace).used >= self.trials:
            study.stop()


def requeue(trial: optuna.Trial) -> None:
    """Enqueue a copy of a running ``trial`` (same parameters, ``failed_trial`` pointing back),
    as Optuna's heartbeat retry does for a trial whose process died."""
    study = trial.study
    frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001 - the params drawn so far
    retry = optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=frozen.params, distributions=frozen.distributions,
        system_attrs={"failed_trial": frozen.number, "retry_history": [*frozen.system_attrs.get("retry_history", []), frozen.number]},
    )
    study._storage.create_new_trial(study._study_id, template_trial=retry)  # noqa: SLF001 - as RetryFailedTrialCallback does


def _normalised(raw: str | None) -> str | None:
    """A stored study file as this version dumps it (fields added since it was stored take their
    defaults, so a study made by an earlier version still resumes)."""
    if raw is None:
        return None
    from optimizer.study.config import parse_study_config

    try:
        config = parse_study_config(json.loads(raw), source="stored study file")
    except (StudyConfigError, ValueError):
        return raw
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def create_or_load_study(config: StudyConfig, *, storage: optuna.storages.RDBStorage) -> tuple[optuna.Study, bool]:
    """The Optuna study of ``config`` (created with the config stored in it, or loaded); ``True`` if new.

    Loading a study whose stored config differs from ``config`` is an error: a study's trials only
    mean something under one config.
    """
    stored = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    try:
        existing = optuna.load_study(study_name=config.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None:
        if _normalised(existing.user_attrs.get(CONFIG_ATTR)) != stored:
            raise StudyConfigError(
                f"study {config.name!r} already exists in {storage.url} with a different study file; "
                "give it a new name, or use `evomerge study resume` with the stored one"
            )
        existing.pruner = make_pruner(config.pruner)
        return existing, False
    study = optuna.create_study(
        study_name=config.name, storage=storage, directions=config.directions,
        sampler=make_sampler(config.sampler), pruner=make_pruner(config.pruner),
    )
    study.set_user_attr(CONFIG_ATTR, stored)
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2; the dashboard shows these names
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in config.objectives] if len(config.directions) > 1 else ["score"])
    return study, True


def run_study(
    config: StudyConfig,
    *,
    folder: StudyFolder,
    progress: bool = True,
    max_consecutive_failures: int = 5,
    runner: StudyRunner | None = None,
    storage_url: str | None = None,
    salt: int = 0,
    notify: Callable[[str], None] | None = None,
) -> optuna.Study:
    """Create or resume the study and run trials until the budget is spent (see the module docstring).

    Budget: with ``budget.trials`` the study ends with that many finished (COMPLETE or PRUNED)
    trials, counted over every process sharing it: a trial starts only while finished + live
    RUNNING trials (of all processes) are fewer than the budget, and a process that finds the rest
    of the budget in other processes' live trials waits for them (failing and retrying those whose
    process died) rather than exiting; two processes deciding in the same instant can still both
    start one. ``budget.seconds`` bounds this process's wall time, waiting included.

    ``storage_url`` overrides the study file's storage (a worker joining a shared study); ``salt``
    makes a worker's sampler seed differ from every other process's (see ``process_seed``).
    ``notify`` is told the set-up's notes (dimensions pinned because they cannot change the
    weights) and each flagged trial (images unchanged although the recipe changed)."""
    runner = runner or StudyRunner(config, folder=folder)  # validates everything; creates nothing
    if isinstance(runner, StudyRunner):
        if runner.pinned and not runner.space.dimensions:  # every searched value was inert: trials would all be one recipe
            raise StudyConfigError("search_space: nothing left to search: " + "; ".join(runner.notes))
        if notify is not None:
            runner.on_note = notify
            for note in runner.notes:
                notify(note)
    url = storage_url or folder.storage_url(config)
    with folder.creating():
        storage = open_storage(url, heartbeat=config.heartbeat)
        study, new = create_or_load_study(config, storage=storage)
        if isinstance(runner, StudyRunner):
            from optimizer.study.calibration import settle_calibration

            settle_calibration(runner, study=study, new=new, notify=notify)
        folder.write_config(config if storage_url is None else config.model_copy(update={"storage": storage_url}))
    if not new or salt:
        # read the trials only now, after the heavy set-up (see process_seed)
        seed = process_seed(config.sampler, trials_so_far=len(study.get_trials(deepcopy=False)), salt=salt)
        study.sampler = make_sampler(config.sampler, seed=seed)
    if "architecture" not in study.user_attrs:
        study.set_user_attr("architecture", runner.space.layout.name)
    if isinstance(runner, StudyRunner) and PROVENANCE_ATTR not in study.user_attrs and new:
        study.set_user_attr(PROVENANCE_ATTR, provenance(parents=runner.parents, config=config))
    if new and config.warm_start:
        for params in warm_start_params(runner.space, config.warm_start):
            study.enqueue_trial(params, skip_if_exists=True)
    budget, beat = config.budget, config.heartbeat
    deadline = None if budget.seconds is None else time.monotonic() + budget.seconds
    usage = settle_trials(study, storage=storage, grace=beat.grace)
    bar = _Progress(total=budget.trials, initial=usage.finished, enabled=progress, max_consecutive_failures=max_consecutive_failures)
    ctrl_c = getattr(runner, "ctrl_c", None) or CtrlC()  # a plain callable runner gets one too
    ctrl_c.requested = False
    callbacks: list[Any] = [bar, lambda study, trial: study.stop() if ctrl_c.requested else None]
    if budget.trials is not None:
        callbacks.append(_TrialBudget(trials=budget.trials, storage=storage, grace=beat.grace))
    try:
        with ctrl_c.installed():
            _loop(study=study, runner=runner, ctrl_c=ctrl_c, storage=storage, config=config, bar=bar, callbacks=callbacks,
                  deadline=deadline, usage=usage, max_consecutive_failures=max_consecutive_failures)
    except KeyboardInterrupt:  # outside the main thread's handler (e.g. during the first settle)
        ctrl_c.requested = True
    finally:
        bar.bar.close()
    if ctrl_c.requested:
        stopped = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("failure") == INTERRUPTED]
        which = f"trial {stopped[-1].number} failed and was re-queued" if stopped else "no trial was running"
        raise StudyInterrupted(f"interrupted: {which}; `evomerge study resume {folder.root}` continues", study=study)
    if bar.failures >= max_consecutive_failures:
        raise StudyFailed(f"{bar.failures} trials in a row failed; the last: {bar.last_failure}")
    return study


def _loop(*, study, runner, ctrl_c, storage, config, bar, callbacks, deadline, usage, max_consecutive_failures) -> None:
    """Run trials until the budget is spent, the deadline passes, too many fail or Ctrl-C."""
    budget, beat = config.budget, config.heartbeat
    while not ctrl_c.requested:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        if budget.trials is not None and usage.finished >= budget.trials:
            break
        if budget.trials is not None and usage.used >= budget.trials:  # the rest is in other processes' hands
            bar.bar.set_postfix_str(f"waiting for {usage.live} trial(s) of other processes")
            time.sleep(min(beat.interval, left) if left is not None else beat.interval)
        else:
            study.optimize(runner, n_trials=None, timeout=left, catch=TRIAL_ERRORS, callbacks=callbacks, gc_after_trial=False)
            if bar.failures >= max_consecutive_failures or budget.trials is None:
                break
        usage = settle_trials(study, storage=storage, grace=beat.grace)
