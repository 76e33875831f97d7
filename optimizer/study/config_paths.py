"""Relative paths in a study file made absolute against the file's folder, before validation.

Which values are paths: ``parents``, each adapter's ``path``, ``config_dir``, ``prompts``,
``render.taesd``, and the path options that scorers declare (:func:`objectives.settings.path_options`)
under ``scorers:`` and each objective's ``options:``. Values of the wrong type are left alone for
validation to report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["resolve_path", "resolve_study_paths"]

_PATH_FIELDS = (("config_dir",), ("prompts",), ("render", "taesd"))


def resolve_path(value: str, base: Path) -> str:
    """``value`` (``~`` expanded) as an absolute path; a relative one is taken relative to ``base``."""
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_study_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths of the study file made absolute (relative to the file's folder)."""
    data = dict(data)
    if isinstance(data.get("parents"), list):
        data["parents"] = [resolve_path(p, base) if isinstance(p, str) else p for p in data["parents"]]
    for field in ("loras", "hypernetworks"):
        if isinstance(data.get(field), list):
            data[field] = [
                {**item, "path": resolve_path(item["path"], base)} if isinstance(item, dict) and isinstance(item.get("path"), str) else item
                for item in data[field]
            ]
    _resolve_scorer_paths(data, base)
    for path in _PATH_FIELDS:
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                break
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            if len(path) > 1:  # copy the nested mapping before writing into it
                parent = dict(node)
                parent[path[-1]] = resolve_path(node[path[-1]], base)
                data[path[0]] = parent
            else:
                data[path[0]] = resolve_path(node[path[0]], base)
    return data


def _resolve_scorer_paths(data: dict[str, Any], base: Path) -> None:
    """The path options of ``scorers:`` and of each objective's ``options:`` made absolute (in place)."""
    from objectives.registry import ScorerRegistryError, get_scorer, scorers
    from objectives.settings import path_options, resolve_paths

    try:
        known = list(scorers().values())
    except ScorerRegistryError:
        return  # reported by validation
    objectives = data.get("objectives")
    named: list[type | None] = []
    if isinstance(objectives, list):
        for item in objectives:
            name = item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None
            try:
                named.append(get_scorer(name) if isinstance(name, str) else None)
            except ScorerRegistryError:
                named.append(None)
        data["objectives"] = [
            {**item, "options": resolve_paths(scorer.Settings, item["options"], base=base)}
            if scorer is not None and isinstance(item, dict) and isinstance(item.get("options"), dict) else item
            for item, scorer in zip(objectives, named, strict=True)
        ]
    if isinstance(data.get("scorers"), dict):
        shared = dict(data["scorers"])
        for scorer in {*known, *(n for n in named if n is not None)}:
            resolved = resolve_paths(scorer.Settings, {k: v for k, v in shared.items() if k in path_options(scorer.Settings)}, base=base)
            shared.update(resolved)
        data["scorers"] = shared
