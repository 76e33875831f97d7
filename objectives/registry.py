"""The scorer registry: every objective a study file, ``evomerge score`` and the runner can name.

A scorer is one class (see :class:`Scorer`): its ``name``, whether ``higher_is_better`` (on the
class, as torchmetrics does; a study may still flip the direction), whether it reads the prompts,
whether it is a mean of per-image scores or a set metric (FID), its ``Settings`` (a pydantic model:
the options a study file or the command line gives it), a one-line ``weights`` note (what files it
needs and where users get them) and ``from_settings``, which builds the stateful objective once per
study (see :mod:`objectives.base` for the update/compute contract).

Where scorers come from, in order:

1. the modules of this package: each ``objectives/*.py`` that decorates a class with
   :func:`register_scorer` (adding a scorer is adding one file);
2. installed plug-ins: the ``evomerge.scorers`` entry-point group (``name = "package.module:Class"``);
3. a ``module:Class`` name given directly in a study file or on the command line.

Heavy imports (open_clip, transformers) happen in ``from_settings``, never at registration, so
listing the registry is cheap.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from optimizer.errors import EvomergeError

__all__ = [
    "ENTRY_POINT_GROUP",
    "BuildContext",
    "Scorer",
    "ScorerRegistryError",
    "ScorerSettings",
    "default_direction",
    "get_scorer",
    "register_scorer",
    "scorer_names",
    "scorers",
]

ENTRY_POINT_GROUP = "evomerge.scorers"


class ScorerRegistryError(EvomergeError, ValueError):
    """An unknown scorer name, or a plug-in that cannot be imported or is not a scorer."""


class ScorerSettings(BaseModel):
    """Base of every scorer's settings: unknown options are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BuildContext:
    """What the objectives of one study share while they are built: the device, and a memo of heavy
    parts (``shared(key, factory)``), so that CLIP score and the aesthetic head load one CLIP model
    and FID and KID compute the reference features once."""

    def __init__(self, *, device: str = "cpu") -> None:
        self.device = device
        self._memo: dict[Hashable, Any] = {}

    def shared(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = factory()
        return self._memo[key]


class Scorer:
    """The registry's view of a scorer class (the objective class itself carries these).

    Class attributes: ``name``; ``higher_is_better``; ``uses_prompts`` (the score depends on the
    prompt, so the sanity gate also checks shuffled captions); ``per_image`` (the value is a mean
    of per-image scores; ``False`` for set metrics such as FID); ``Settings``; ``weights`` (what to
    download, where). ``from_settings(settings, *, context)`` returns the objective."""

    name: ClassVar[str]
    higher_is_better: ClassVar[bool]
    uses_prompts: ClassVar[bool] = True
    per_image: ClassVar[bool] = True
    Settings: ClassVar[type[ScorerSettings]] = ScorerSettings
    weights: ClassVar[str] = "none"

    @classmethod
    def from_settings(cls, settings: Any, *, context: BuildContext) -> Any:  # pragma: no cover - the contract
        raise NotImplementedError



_REQUIRED = ("name", "higher_is_better", "Settings", "from_settings")
_registry: dict[str, type] = {}
_discovered = False

S = TypeVar("S", bound=type)


def _check_scorer(cls: Any, *, source: str) -> type:
    if not isinstance(cls, type):
        raise ScorerRegistryError(f"{source}: {cls!r} is not a class")
    missing = [a for a in _REQUIRED if not hasattr(cls, a)]
    if missing:
        raise ScorerRegistryError(f"{source}: {cls.__name__} is not a scorer: it has no {', '.join(missing)} (see objectives.registry.Scorer)")
    if not isinstance(cls.name, str) or not cls.name:
        raise ScorerRegistryError(f"{source}: {cls.__name__}.name must be a non-empty string")
    if not isinstance(cls.higher_is_better, bool):
        raise ScorerRegistryError(f"{source}: {cls.__name__}.higher_is_better must be True or False")
    if not (isinstance(cls.Settings, type) and issubclass(cls.Settings, BaseModel)):
        raise ScorerRegistryError(f"{source}: {cls.__name__}.Settings must be a pydantic model class")
    for attr, default in (("uses_prompts", True), ("per_image", True), ("weights", "none")):
        if not hasattr(cls, attr):
            setattr(cls, attr, default)
    return cls


def default_direction(scorer: type) -> str:
    """``"maximize"`` for a scorer whose higher values are better, else ``"minimize"``."""
    return "maximize" if scorer.higher_is_better else "minimize"


def register_scorer(cls: S) -> S:
    """Class decorator: add a scorer to the registry (its ``name`` must be new)."""
    _check_scorer(cls, source=f"{cls.__module__}.{getattr(cls, '__qualname__', cls)}")
    other = _registry.get(cls.name)
    if other is not None and other is not cls and f"{other.__module__}.{other.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
        raise ScorerRegistryError(f"scorer {cls.name!r} is registered twice: {other.__module__}.{other.__qualname__} and {cls.__module__}.{cls.__qualname__}")
    _registry[cls.name] = cls
    return cls


def _discover() -> None:
    """Import this package's modules (each registers its scorers) and the installed plug-ins, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import objectives

    for info in sorted(pkgutil.iter_modules(objectives.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"objectives.{info.name}")
    from optimizer.plugins import group_entry_points

    for entry in group_entry_points(ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise ScorerRegistryError(f"scorer plug-in {entry.name!r} ({entry.value}) cannot be imported: {type(exc).__name__}: {exc}") from None
        cls = _check_scorer(cls, source=f"scorer plug-in {entry.name!r} ({entry.value})")
        if cls.name != entry.name:
            raise ScorerRegistryError(f"scorer plug-in {entry.name!r} ({entry.value}) calls itself {cls.name!r}; the entry point must use the scorer's name")
        _registry.setdefault(cls.name, cls)


def _import_path(spec: str) -> type:
    from optimizer.plugins import import_object

    try:
        cls = import_object(spec)
    except ValueError as exc:
        raise ScorerRegistryError(f"scorer {spec!r}: {exc}") from None
    return _check_scorer(cls, source=f"scorer {spec!r}")


def scorers() -> dict[str, type]:
    """Every registered scorer by name (built-ins and installed plug-ins), sorted by name."""
    _discover()
    return dict(sorted(_registry.items()))


def scorer_names() -> list[str]:
    return list(scorers())


def get_scorer(name: str) -> type:
    """The scorer class called ``name`` (a registered name or ``module:Class``)."""
    if ":" in name:
        return _import_path(name)
    known = scorers()
    if name not in known:
        raise ScorerRegistryError(f"unknown objective {name!r}; known: {', '.join(known)} (or a plug-in as module:Class)")
    return known[name]
