"""One way to report a pydantic ``ValidationError``: every problem as ``field.path: message``."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

__all__ = ["describe_validation_error", "read_yaml_file"]


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


def read_yaml_file(path: str | os.PathLike[str], *, error: type[ValueError], missing: str) -> object:
    """Parsed YAML of ``path``; ``error`` (naming the file) when it is absent (``"{missing} at PATH"``),
    unreadable or not valid YAML."""
    import yaml

    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or device: reading it would block or never end
        raise error(f"{path}: not a regular file (a FIFO or a device), not a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{missing} at {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not a readable YAML file ({exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
