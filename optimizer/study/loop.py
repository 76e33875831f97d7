"""The study loop: create or resume the Optuna study, then run trials until the budget is spent.

:func:`run_study` builds (or takes) a :class:`~optimizer.study.runner.StudyRunner`, opens the
storage, creates or loads the study (:func:`create_or_load_study` refuses a stored study file that
differs), settles calibration, and runs trials under a budget shared by every process on the
storage (:class:`_TrialBudget`), a wall-time deadline, Ctrl-C (:mod:`optimizer.study.interrupts`)
and a stop after ``max_consecutive_failures`` failed trials in a row (:class:`StudyFailed`).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna

from optimizer.errors import EvomergeError
from optimizer.study.config import StudyConfig, StudyConfigError
from optimizer.study.export import PROVENANCE_ATTR, provenance
from optimizer.study.interrupts import INTERRUPTED, CtrlC, StudyInterrupted
from optimizer.study.liveness import settle_trials
from optimizer.study.runner import TRIAL_ERRORS, StudyRunner
from optimizer.study.samplers import make_pruner, make_sampler, process_seed
from optimizer.study.space import warm_start_params
from optimizer.study.storage import CONFIG_ATTR, StudyFolder, open_storage

__all__ = ["StudyFailed", "StudyInterrupted", "create_or_load_study", "run_study"]


class StudyFailed(EvomergeError, RuntimeError):
    """Too many trials in a row failed: the set-up is broken."""


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


def create_or_load_study(config: StudyConfig, *, storage: optuna.storages.RDBStorage, space: Any = None) -> tuple[optuna.Study, bool]:
    """The Optuna study of ``config`` (created with the config stored in it, or loaded); ``True`` if new.
    ``space``: the bound search space, for a sampler that takes it (see ``make_sampler``).

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
        sampler=make_sampler(config.sampler, space=space), pruner=make_pruner(config.pruner),
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
        study, new = create_or_load_study(config, storage=storage, space=runner.space)
        if isinstance(runner, StudyRunner):
            from optimizer.study.calibration import settle_calibration

            settle_calibration(runner, study=study, new=new, notify=notify)
        folder.write_config(config if storage_url is None else config.model_copy(update={"storage": storage_url}))
    if not new or salt:
        # read the trials only now, after the heavy set-up (see process_seed)
        seed = process_seed(config.sampler, trials_so_far=len(study.get_trials(deepcopy=False)), salt=salt)
        study.sampler = make_sampler(config.sampler, seed=seed, space=runner.space)
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
