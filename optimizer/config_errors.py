"""One way to report a pydantic ``ValidationError``: every problem as ``field.path: message``."""

from __future__ import annotations

from pydantic import ValidationError

__all__ = ["describe_validation_error"]


def _location(loc: tuple[object, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def describe_validation_error(exc: ValidationError) -> str:
    """``"a.b[2]: message; c: message"`` for every error of ``exc`` (pydantic's union-branch
    tags such as ``str`` / ``function-after[...]`` are dropped from the path)."""
    problems = []
    for error in exc.errors():
        loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float", "list", "dict"})))
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{_location(loc)}: {message}")
    return "; ".join(problems)
