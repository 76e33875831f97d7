"""The one base class of every expected evomerge failure (as optuna's ``OptunaError``).

Contract: an :class:`EvomergeError` is a failure the user can act on (a bad file, a bad argument,
a broken set-up); its message is one line that names the culprit. The CLI turns it into
``error: MESSAGE`` and exit code 2; a study fails one trial with it (recorded as the trial's
``failure``). Anything else (a bare ``ValueError``, ``RuntimeError``, ``KeyError``) is a bug: the
CLI lets its traceback through and a study stops on it instead of failing trial after trial.

Subclasses keep a builtin base as well (``ValueError`` for bad input, ``RuntimeError`` for
failures while running) so callers that catch those keep working.
"""

from __future__ import annotations

__all__ = ["EvomergeError", "InputError"]


class EvomergeError(Exception):
    """Base class of every expected evomerge failure (see the module docstring)."""


class InputError(EvomergeError, ValueError):
    """A file or argument the user gave cannot be used (the message names it and says why)."""
