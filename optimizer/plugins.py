"""Plug-ins: objects named ``module:Attribute`` (a scorer class, a sampler class) and installed
packages' entry points, found by one importer.

Entry-point groups evomerge reads (declared in a package's ``pyproject.toml``):

* ``evomerge.commands``: ``NAME = "module:register"``; ``register(app)`` adds commands to the
  ``evomerge`` command line (the embedded zoo's ``evomerge zoo ...`` arrives this way);
* ``evomerge.scorers``: ``NAME = "module:Scorer"``; a scorer class registered under its name
  (see :mod:`objectives.registry`);
* ``evomerge.open_clip_models``: ``MODEL = "module:register"``; ``register()`` adds the open_clip
  architecture ``MODEL`` to open_clip's registry, called when a study names that model (the zoo's
  ``evomerge-digits-clip`` arrives this way).
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["COMMANDS_GROUP", "OPEN_CLIP_GROUP", "entry_point", "group_entry_points", "import_object"]

COMMANDS_GROUP = "evomerge.commands"
OPEN_CLIP_GROUP = "evomerge.open_clip_models"


def import_object(spec: str) -> Any:
    """The object ``module:attr.path`` names; ``ValueError`` saying which part is wrong otherwise."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"a plug-in is named module:Class, got {spec!r}")
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name}: {exc}") from None
    for part in attribute.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ValueError(f"{module_name} has no {attribute}")
    return found


def group_entry_points(group: str) -> list[EntryPoint]:
    """The installed entry points of ``group``, sorted by name (a stable order for help texts)."""
    return sorted(entry_points(group=group), key=lambda point: point.name)


def entry_point(group: str, name: str) -> Any | None:
    """The object the entry point ``name`` of ``group`` names, loaded; ``None`` if no package declares it.
    ``ValueError`` if it is declared but cannot be loaded (a broken plug-in is named, not skipped)."""
    for point in group_entry_points(group):
        if point.name == name:
            try:
                return point.load()
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"the {group} plug-in {name} ({point.value}) cannot be loaded: {exc}") from None
    return None
