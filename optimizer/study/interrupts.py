"""Ctrl-C during a study: stop where it is safe, fail the running trial with its reason, re-queue it.

:class:`CtrlC` is installed by :func:`optimizer.study.loop.run_study` in the main thread. A trial's
merge and render are interruptible (Ctrl-C raises at once and the trial becomes
:class:`TrialInterrupted`, FAIL with :data:`INTERRUPTED` and re-queued by :func:`requeue` with the
same parameters); anywhere else the request waits for the current step, so nothing is left
half-written in the storage. :class:`StudyInterrupted` carries the study back to the caller.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

import optuna

from optimizer.errors import EvomergeError

__all__ = ["INTERRUPTED", "CtrlC", "StudyInterrupted", "TrialInterrupted", "requeue"]

#: the ``failure`` of a trial stopped by Ctrl-C (it is re-queued with the same parameters)
INTERRUPTED = "interrupted (Ctrl-C / SIGINT); re-queued with the same parameters"


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
