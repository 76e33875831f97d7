"""Which trials of a study are alive, which died with their process, and how much budget is used.

Optuna's heartbeat (``RDBStorage(heartbeat_interval=..., grace_period=...)``) writes a beat for
every RUNNING trial every ``interval`` seconds, and before each new trial fails those whose last
beat is older than ``grace`` (``optuna.storages.fail_stale_trials``). Two gaps are closed here:

* **A trial that never beat.** A process killed between creating a trial (RUNNING) and its
  heartbeat thread's first write leaves a trial with no beat at all; Optuna skips such trials, so
  it would stay RUNNING forever and never be retried. Here a RUNNING trial with no beat whose
  ``datetime_start`` is more than ``grace`` seconds ago is dead too.
* **A trial budget shared by many processes.** ``MaxTrialsCallback`` stops a process once the
  finished trials reach the budget, so N processes overshoot by up to N - 1 trials (each finishes
  the trial it has in flight). :func:`settle_trials` also counts the *live* RUNNING trials of every
  process, so a process starts a trial only while ``finished + live < budget``, and one that sees
  the budget covered by live trials waits for them instead of exiting (if one of them fails, the
  budget is open again and the waiting process runs the replacement).

Liveness is read straight from Optuna's RDB schema (tables ``trials``, ``studies`` and
``trial_heartbeats``, unchanged since Optuna 2.9), with the database's own clock for beats (as
Optuna does) and the local clock for ``datetime_start`` (which Optuna writes from the local clock).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime, timedelta

import optuna
import sqlalchemy

__all__ = ["BudgetUsage", "RunningTrial", "running_trials", "settle_trials"]

_RUNNING = sqlalchemy.text(
    "SELECT t.trial_id, t.number, t.datetime_start, h.heartbeat "
    "FROM trials t JOIN studies s ON s.study_id = t.study_id "
    "LEFT JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
    "WHERE s.study_name = :study_name AND t.state = 'RUNNING' ORDER BY t.number"
).columns(
    sqlalchemy.column("trial_id", sqlalchemy.Integer),
    sqlalchemy.column("number", sqlalchemy.Integer),
    sqlalchemy.column("datetime_start", sqlalchemy.DateTime),
    sqlalchemy.column("heartbeat", sqlalchemy.DateTime),
)


@dataclass(frozen=True)
class RunningTrial:
    """A RUNNING trial and how long its process has been silent.

    ``silent_s`` is the time since its last beat, or since it started when it never beat."""

    trial_id: int
    number: int
    silent_s: float

    def dead(self, *, grace: float) -> bool:
        """Its process stopped beating (or never beat) more than ``grace`` seconds ago."""
        return self.silent_s > grace


@dataclass(frozen=True)
class BudgetUsage:
    """``finished``: COMPLETE or PRUNED trials; ``live``: RUNNING trials whose process is alive;
    ``failed``: numbers of the dead trials this call failed (and handed on for a retry)."""

    finished: int
    live: int
    failed: tuple[int, ...] = ()

    @property
    def used(self) -> int:
        return self.finished + self.live


def running_trials(storage: optuna.storages.RDBStorage, *, study_name: str) -> list[RunningTrial]:
    """The RUNNING trials of ``study_name`` with their silence (see the module docstring)."""
    with storage.engine.connect() as connection:
        db_now = connection.execute(sqlalchemy.select(sqlalchemy.func.now())).scalar()
        rows = connection.execute(_RUNNING, {"study_name": study_name}).all()
    if isinstance(db_now, str):  # SQLite's CURRENT_TIMESTAMP through func.now() in a plain select
        db_now = datetime.fromisoformat(db_now)
    db_now = db_now.replace(tzinfo=None)
    local_now = datetime.now()
    out = []
    for trial_id, number, started, beat in rows:
        if beat is not None:
            silent = db_now - beat.replace(tzinfo=None)
        else:
            silent = local_now - started if started is not None else timedelta(0)
        out.append(RunningTrial(trial_id=trial_id, number=number, silent_s=silent.total_seconds()))
    return out


def settle_trials(study: optuna.Study, *, storage: optuna.storages.RDBStorage, grace: float) -> BudgetUsage:
    """Fail the RUNNING trials whose process is dead, hand each to the storage's heartbeat-stale
    callback (which re-enqueues it for a retry), and count how much of a trial budget is spent or
    being spent by the others (see the module docstring).

    Safe against other processes doing the same: the state change is a conditional update, and
    only the process whose update took calls the callback (so a trial is retried once)."""
    failed, live = [], 0
    for trial in running_trials(storage, study_name=study.study_name):
        if not trial.dead(grace=grace):
            live += 1
            continue
        try:
            if storage.set_trial_state_values(trial.trial_id, state=optuna.trial.TrialState.FAIL):
                failed.append(trial)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed (or the trial's own process finished) it first
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial in failed:
        if callback is not None:
            callback(study, copy.deepcopy(storage.get_trial(trial.trial_id)))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=states))
    return BudgetUsage(finished=finished, live=live, failed=tuple(trial.number for trial in failed))
