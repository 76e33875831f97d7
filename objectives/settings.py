"""Scorer options as data: the settings shared by a study file's ``scorers:`` section and each
objective's ``options:``, merged and validated against the scorer's ``Settings`` model.

A study file gives options in two places. ``scorers:`` holds options shared by every objective
whose settings declare that name (``clip_model`` for CLIP score, the aesthetic head and CLIP-feature
FID; ``reference`` for FID and KID); an objective's ``options:`` override them for that objective
only. A ``null`` value means "the scorer's default". Path options (declared with :data:`LocalPath`)
are made absolute against the study file's folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import ValidationError

from optimizer.config_errors import describe_validation_error

__all__ = ["LocalPath", "PathOption", "PathOrTag", "TagOrPathOption", "canonical_shared", "is_path_like", "merged_settings", "path_options", "resolve_paths", "unknown_shared"]


class PathOption:
    """Marker: this option is a local file or folder (resolved against the study file's folder)."""


#: a settings field holding a local path
LocalPath = Annotated[str, PathOption()]


class TagOrPathOption(PathOption):
    """Marker: this option is a library's name for downloadable weights (``openai``) or a local file;
    a value that looks like a path (a separator, ``~``, ``.`` or a file suffix) is resolved like a path."""


#: a settings field holding a pretrained tag or a local path
PathOrTag = Annotated[str, TagOrPathOption()]


def is_path_like(value: str) -> bool:
    """``value`` names a file or folder rather than a tag: it has a separator, starts with ``~``/``.``, or has a suffix."""
    return "/" in value or os.path.sep in value or value.startswith(("~", ".")) or Path(value).suffix != ""


def path_options(settings: type) -> set[str]:
    """Names of the path options of a settings model."""
    return {name for name, field in settings.model_fields.items() if any(isinstance(m, PathOption) for m in field.metadata)}


def resolve_paths(settings: type, values: Mapping[str, Any], *, base: Path) -> dict[str, Any]:
    """``values`` with each path option made absolute against ``base`` (``~`` expanded)."""
    out = dict(values)
    fields = settings.model_fields
    for name in path_options(settings) & set(out):
        tag_or_path = any(isinstance(m, TagOrPathOption) for m in fields[name].metadata)
        if isinstance(out[name], str) and (not tag_or_path or is_path_like(out[name])):
            path = Path(os.path.expanduser(out[name]))
            out[name] = str(path if path.is_absolute() else (base / path).resolve())
    return out


def unknown_shared(shared: Mapping[str, Any], scorers: Iterable[type]) -> list[str]:
    """Keys of ``scorers:`` that no registered scorer's settings declare."""
    known = {name for scorer in scorers for name in scorer.Settings.model_fields}
    return sorted(set(shared) - known)


def canonical_shared(shared: Mapping[str, Any], scorers: Iterable[type]) -> dict[str, Any]:
    """``shared`` without ``null`` values and without values equal to the default of every scorer
    declaring the key: two study files that mean the same thing store the same ``scorers:``."""
    scorers = list(scorers)
    out: dict[str, Any] = {}
    for key, value in shared.items():
        if value is None:
            continue
        defaults = [s.Settings.model_fields[key].get_default(call_default_factory=True) for s in scorers if key in s.Settings.model_fields]
        if defaults and all(d == value for d in defaults):
            continue
        out[key] = value
    return dict(sorted(out.items()))


def merged_settings(scorer: type, *, shared: Mapping[str, Any], options: Mapping[str, Any], where: str,
                    how: Callable[[str], str] | None = None) -> Any:
    """The scorer's settings: the shared options it declares, overridden by ``options``.

    Raises ``ValueError`` naming ``where`` (e.g. ``objectives[1] (fid)``) and the field; a missing
    required option is named as ``scorers.FIELD`` (where most studies give it), or as ``how(FIELD)``
    says (the command line names its own option)."""
    fields = scorer.Settings.model_fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise ValueError(f"{where}: options.{unknown[0]}: {scorer.name} has no option {unknown[0]!r} (its options: {known})")
    values = {k: v for k, v in shared.items() if k in fields and v is not None}
    values.update({k: v for k, v in options.items() if v is not None})
    try:
        return scorer.Settings.model_validate(values)
    except ValidationError as exc:
        missing = [e["loc"][0] for e in exc.errors() if e["type"] == "missing" and e["loc"]]
        if missing:
            field = missing[0]
            doc = fields[field].description or ""
            doc = f" ({doc})" if doc else ""
            if how is not None:
                raise ValueError(f"objective {scorer.name} needs {how(field)}{doc}") from None
            raise ValueError(f"scorers.{field}: objective {scorer.name} needs {field}{doc} - give it under scorers: or {where}.options") from None
        raise ValueError(f"{where}: {describe_validation_error(exc)}") from None
