"""Errors of the merge package; all are ``ValueError`` subclasses with messages naming the culprit."""

from optimizer.errors import EvomergeError


class MergeError(EvomergeError, ValueError):
    """Base class of merge errors."""


class MergeMethodError(MergeError):
    """An unknown method, a wrong number of parents, or a parameter out of its range."""


class RecipeError(MergeError):
    """A recipe does not fit the layout or the method (missing/extra block or parameter)."""


class ParentMismatchError(MergeError):
    """Parents do not have identical keys and shapes, or a key cannot be placed in the bank."""
