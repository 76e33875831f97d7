"""From names and options to built objectives: the one path the study runner and ``evomerge score`` share.

:func:`objective_spec` resolves a scorer name (registered, or ``module:Class``) and validates its
settings (shared ``scorers:`` options overridden by the objective's own ``options:``, see
:mod:`objectives.settings`); :func:`build_objectives` builds every objective of a study once, with
one :class:`~objectives.registry.BuildContext` so that heavy parts are shared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from objectives.base import Direction, Objective
from objectives.registry import BuildContext, ScorerRegistryError, default_direction, get_scorer
from objectives.settings import merged_settings

__all__ = ["ObjectiveSpec", "build_objectives", "objective_spec"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """One validated objective: the scorer class, its settings and the study's direction for it."""

    name: str  # as the study names it (a registry name or module:Class)
    scorer: type
    settings: Any
    direction: Direction

    @property
    def label(self) -> str:
        """The name results are stored under: the scorer's own name."""
        return self.scorer.name


def objective_spec(
    name: str, *, shared: Mapping[str, Any] | None = None, options: Mapping[str, Any] | None = None,
    direction: Direction | None = None, where: str | None = None, how: Callable[[str], str] | None = None,
) -> ObjectiveSpec:
    """Resolve ``name`` and validate its settings; ``ValueError`` names ``where`` and the field."""
    scorer = get_scorer(name)
    settings = merged_settings(scorer, shared=shared or {}, options=options or {}, where=where or f"objective {name}", how=how)
    return ObjectiveSpec(name=name, scorer=scorer, settings=settings, direction=direction or default_direction(scorer))


def build_objectives(specs: Sequence[ObjectiveSpec], *, device: str = "cpu") -> list[Objective]:
    """Build each objective once (shared parts built once for all); each carries its spec's
    ``name`` (the scorer's) and ``direction``."""
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ScorerRegistryError(f"objectives: each scorer once, got {labels}")
    context = BuildContext(device=device)
    built: list[Objective] = []
    for spec in specs:
        objective = spec.scorer.from_settings(spec.settings, context=context)
        missing = [m for m in ("reset", "update", "compute") if not callable(getattr(objective, m, None))]
        if missing:
            raise ScorerRegistryError(f"scorer {spec.name!r}: from_settings returned {type(objective).__name__}, which has no {', '.join(missing)}")
        objective.name = spec.label
        objective.direction = spec.direction
        built.append(objective)
    return built
