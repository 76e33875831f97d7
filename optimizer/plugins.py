"""Plug-ins named ``module:Attribute`` (a scorer class, a sampler class): the one importer."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_object"]


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
