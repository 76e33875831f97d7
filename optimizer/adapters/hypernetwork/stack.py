"""Several hypernetworks applied in order, each with its strength (A1111's ``apply_hypernetworks``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from optimizer.adapters.hypernetwork.modules import Hypernetwork
from optimizer.adapters.hypernetwork.structure import _is_number


class HypernetworkStack(nn.Module):
    """Hypernetworks applied in sequence, each with its own strength (its :attr:`Hypernetwork.strength`).

    ``apply_k(context)`` is ``context`` passed through every hypernetwork's key module for
    ``context.shape[-1]``, in order (those without that width are skipped); ``apply_v`` likewise
    with the value modules. Strengths live on the hypernetworks, so :meth:`set_strengths` is a
    cheap attribute change that installed processors see at their next call. A hypernetwork may
    appear only once in a stack.
    """

    def __init__(
        self, hypernetworks: Iterable[Hypernetwork] = (), *, strengths: Sequence[float] | Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        self.hypernetworks = nn.ModuleList()
        for hypernetwork in hypernetworks:
            self.append(hypernetwork)
        if strengths is not None:
            self.set_strengths(strengths)

    def append(self, hypernetwork: Hypernetwork, *, strength: float | None = None) -> None:
        """Add ``hypernetwork`` last (applied after the others); set its strength when given."""
        if not isinstance(hypernetwork, Hypernetwork):
            raise TypeError(f"a HypernetworkStack holds Hypernetworks, not {type(hypernetwork).__name__}")
        if any(h is hypernetwork for h in self.hypernetworks):
            raise ValueError(f"hypernetwork {hypernetwork.name!r} is already in this stack")
        if strength is not None:
            hypernetwork.strength = strength
        self.hypernetworks.append(hypernetwork)

    def __len__(self) -> int:
        return len(self.hypernetworks)

    def __iter__(self) -> Iterator[Hypernetwork]:
        return iter(self.hypernetworks)  # type: ignore[arg-type]

    def __getitem__(self, index: int | str) -> Hypernetwork:
        """By position, or by name (which must then be unique in the stack)."""
        if isinstance(index, str):
            return self.hypernetworks[self._position(index)]  # type: ignore[return-value]
        return self.hypernetworks[index]  # type: ignore[return-value]

    def _position(self, name: str) -> int:
        positions = [i for i, h in enumerate(self) if h.name == name]
        if len(positions) != 1:
            problem = "no hypernetwork" if not positions else f"{len(positions)} hypernetworks"
            raise ValueError(f"{problem} named {name!r} in this stack; its names: {self.names}")
        return positions[0]

    @property
    def names(self) -> list[str]:
        return [h.name for h in self]

    @property
    def strengths(self) -> list[float]:
        return [h.strength for h in self]

    @property
    def dims(self) -> frozenset[int]:
        """Every context width some hypernetwork of the stack transforms."""
        return frozenset(d for h in self for d in h.dims)

    def set_strengths(self, strengths: Sequence[float] | Mapping[str, float]) -> None:
        """Set strengths: a sequence gives one per hypernetwork in order; a mapping sets those it
        names (unique names), leaving the others. All values are checked before any is set."""
        if isinstance(strengths, Mapping):
            targets = [(self._position(name), value) for name, value in strengths.items()]
        else:
            values = list(strengths)
            if len(values) != len(self):
                raise ValueError(f"{len(values)} strength(s) for a stack of {len(self)} hypernetwork(s) {self.names}")
            targets = list(enumerate(values))
        bad = [f"{self[i].name!r}: {v!r}" for i, v in targets if not _is_number(v)]
        if bad:
            raise ValueError(f"strengths must be finite numbers: {', '.join(bad)}")
        for i, value in targets:
            self[i].strength = value

    def apply_k(self, context: torch.Tensor) -> torch.Tensor:
        """``context`` through every hypernetwork's key module of its width, in order."""
        for hypernetwork in self:
            context = hypernetwork.apply_k(context)
        return context

    def apply_v(self, context: torch.Tensor) -> torch.Tensor:
        """``context`` through every hypernetwork's value module of its width, in order."""
        for hypernetwork in self:
            context = hypernetwork.apply_v(context)
        return context

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(apply_k(context), apply_v(context))``: the key and value contexts of an attention layer."""
        return self.apply_k(context), self.apply_v(context)


