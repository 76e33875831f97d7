"""Hypernetwork modules: one residual MLP per context width and side (key / value), creation and saving in A1111's format."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimizer.adapters.hypernetwork.structure import (
    _DEFAULT_LAYER_STRUCTURE,
    WEIGHT_INITS,
    HypernetworkError,
    HypernetworkStructure,
    _is_number,
)
from optimizer.atomic import write_atomic


class HypernetworkModule(nn.Module):
    """One A1111 ``HypernetworkModule`` (the key or the value transform of one width).

    ``forward(x, strength) = x + strength * linear(x)``; ``x`` itself when ``strength == 0``.
    ``linear`` runs in this module's dtype (``x`` is cast to it, the residual cast back).
    """

    def __init__(self, dim: int, structure: HypernetworkStructure) -> None:
        super().__init__()
        self.dim = dim
        self.structure = structure
        self.linear = nn.Sequential(*structure.layers(dim))

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        if strength == 0:
            return x
        dtype = self.linear[0].weight.dtype
        return x + (self.linear(x.to(dtype)) * strength).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _initialise(module: HypernetworkModule, *, weight_init: str, generator: torch.Generator) -> None:
    """A1111's initialisation of a new module: with ``'Normal'``, every Linear and LayerNorm weight
    ~ N(0, 0.01) (LayerNorm weights too, as A1111 does for every scheme) and biases 0; with the
    Xavier/Kaiming schemes, those for the Linear weights (Kaiming for ``'relu'``, or
    ``'leaky_relu'`` when the activation is ``'leakyrelu'``)."""
    nonlinearity = "leaky_relu" if module.structure.activation == "leakyrelu" else "relu"
    for layer in module.linear:
        if type(layer) not in (nn.Linear, nn.LayerNorm):
            continue
        weight, bias = layer.weight, layer.bias
        if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
            nn.init.normal_(weight, mean=0.0, std=0.01, generator=generator)
        elif weight_init == "XavierUniform":
            nn.init.xavier_uniform_(weight, generator=generator)
        elif weight_init == "XavierNormal":
            nn.init.xavier_normal_(weight, generator=generator)
        elif weight_init == "KaimingUniform":
            nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity, generator=generator)
        else:  # KaimingNormal (checked by the caller)
            nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity, generator=generator)
        nn.init.zeros_(bias)


def _check_dims(dims: Iterable[int]) -> list[int]:
    values = list(dims)
    bad = [d for d in values if not isinstance(d, int) or isinstance(d, bool) or d < 1]
    if not values or bad:
        raise HypernetworkError(f"dims must be one or more positive integer context widths, got {values!r}")
    if len(set(values)) != len(values):
        raise HypernetworkError(f"dims must not repeat, got {values!r}")
    return values


def _moved(module: nn.Module, *, device: str | torch.device | None, dtype: torch.dtype | None) -> None:
    if device is not None or dtype is not None:
        module.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})


class Hypernetwork(nn.Module):
    """One A1111 hypernetwork: a (key, value) :class:`HypernetworkModule` pair per context width.

    ``layers[str(dim)]`` is an ``nn.ModuleList`` ``[k_module, v_module]``; :attr:`dims` lists the
    widths in file order. :attr:`strength` (default 1.0) is the multiplier of both modules of
    every width. ``structure`` is the shared :class:`HypernetworkStructure`; ``name``, ``step``,
    ``weight_init``, ``sd_checkpoint``, ``sd_checkpoint_name`` and ``optional_info`` are the A1111
    metadata, written back by :meth:`state_for_a1111`.

    Built in eval mode with ``requires_grad`` off; ``train()`` switches gradients on (see the
    module docstring). Use :meth:`new` for a fresh one and :func:`load_hypernetwork` for a file.
    """

    def __init__(
        self,
        *,
        name: str,
        structure: HypernetworkStructure,
        pairs: Mapping[int, tuple[HypernetworkModule, HypernetworkModule]],
        weight_init: str = "Normal",
        step: int = 0,
        sd_checkpoint: str | None = None,
        sd_checkpoint_name: str | None = None,
        optional_info: str | None = None,
        strength: float = 1.0,
    ) -> None:
        super().__init__()
        _check_dims(pairs)
        for dim, pair in pairs.items():
            if len(pair) != 2 or any(
                not isinstance(m, HypernetworkModule) or m.dim != dim or m.structure != structure for m in pair
            ):
                raise HypernetworkError(f"pairs[{dim}] must be two HypernetworkModules of width {dim} built from structure")
        self.name = name
        self.structure = structure
        self.weight_init = weight_init
        self.step = step
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.strength = strength
        self.layers = nn.ModuleDict({str(dim): nn.ModuleList(pair) for dim, pair in pairs.items()})
        self.train(False)

    @classmethod
    def new(
        cls,
        *,
        dims: Iterable[int],
        name: str,
        layer_structure: Sequence[float] = _DEFAULT_LAYER_STRUCTURE,
        activation: str = "linear",
        layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
        weight_init: str = "Normal",
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Hypernetwork:
        """A freshly initialised hypernetwork (A1111's "Create hypernetwork"), reproducible from ``seed``.

        Weights follow ``weight_init`` (see :data:`WEIGHT_INITS`; A1111's default ``'Normal'``:
        N(0, 0.01) weights, zero biases, so ``x + mlp(x)`` starts close to ``x``), drawn from a
        CPU generator seeded with ``seed`` for the widths in ``dims`` order, key module then value
        module; then moved to ``device`` / ``dtype``.
        """
        structure = HypernetworkStructure(
            layer_structure=tuple(layer_structure),
            activation=activation,
            layer_norm=layer_norm,
            activate_output=activate_output,
            dropout_structure=None if dropout_structure is None else tuple(dropout_structure),
        )
        if weight_init not in WEIGHT_INITS:
            raise HypernetworkError(f"weight_initialization {weight_init!r} is not one of {', '.join(WEIGHT_INITS)}")
        generator = torch.Generator().manual_seed(seed)
        pairs: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
        for dim in _check_dims(dims):
            pair = (HypernetworkModule(dim, structure), HypernetworkModule(dim, structure))
            for module in pair:
                _initialise(module, weight_init=weight_init, generator=generator)
            pairs[dim] = pair
        hypernetwork = cls(name=name, structure=structure, pairs=pairs, weight_init=weight_init)
        _moved(hypernetwork, device=device, dtype=dtype)
        return hypernetwork

    # ---------------------------------------------------------------- queries

    @property
    def strength(self) -> float:
        """The multiplier of every module: ``x + strength * mlp(x)``; any finite number (0: no effect)."""
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        if not _is_number(value):
            raise ValueError(f"hypernetwork {self.name!r}: strength must be a finite number, not {value!r}")
        self._strength = float(value)

    @property
    def dims(self) -> tuple[int, ...]:
        """Context widths this hypernetwork transforms, in file order."""
        return tuple(int(dim) for dim in self.layers)

    def pair(self, dim: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        """``(k_module, v_module)`` for context width ``dim``, or ``None`` when there is none."""
        key = str(dim)
        if key not in self.layers:
            return None
        k_module, v_module = self.layers[key]
        return k_module, v_module  # type: ignore[return-value]

    # ---------------------------------------------------------------- application

    def apply_k(self, context: torch.Tensor) -> torch.Tensor:
        """``context + strength * mlp_k(context)`` when a pair exists for ``context.shape[-1]``, else ``context``."""
        pair = self.pair(context.shape[-1])
        return context if pair is None else pair[0](context, self._strength)

    def apply_v(self, context: torch.Tensor) -> torch.Tensor:
        """``context + strength * mlp_v(context)`` when a pair exists for ``context.shape[-1]``, else ``context``."""
        pair = self.pair(context.shape[-1])
        return context if pair is None else pair[1](context, self._strength)

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(apply_k(context), apply_v(context))``."""
        return self.apply_k(context), self.apply_v(context)

    def train(self, mode: bool = True) -> Hypernetwork:
        """Train (``mode``) or eval mode, with ``requires_grad`` set to ``mode`` on every parameter, as A1111."""
        super().train(mode)
        for parameter in self.parameters():
            parameter.requires_grad_(mode)
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dims={list(self.dims)}, strength={self._strength}, {self.structure.describe()}"

    # ---------------------------------------------------------------- saving

    def state_for_a1111(self) -> dict[Any, Any]:
        """The dict A1111's ``Hypernetwork.save`` writes: ``{dim: (k_state, v_state)}`` with CPU
        tensor copies in this hypernetwork's dtype, plus its fields (``use_dropout`` and
        ``last_layer_dropout`` derived from ``dropout_structure`` as A1111 does)."""
        dropout = list(self.structure.dropout_structure or ())
        state: dict[Any, Any] = {}
        for dim in self.dims:
            state[dim] = tuple(
                {key: tensor.detach().to("cpu").clone() for key, tensor in module.state_dict().items()}
                for module in self.layers[str(dim)]
            )
        state.update(
            {
                "step": self.step,
                "name": self.name,
                "layer_structure": list(self.structure.layer_structure),
                "activation_func": self.structure.activation,
                "is_layer_norm": self.structure.layer_norm,
                "weight_initialization": self.weight_init,
                "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name,
                "activate_output": self.structure.activate_output,
                "use_dropout": any(p > 0 for p in dropout),
                "dropout_structure": dropout,
                "last_layer_dropout": len(dropout) >= 2 and dropout[-2] != 0,
                "optional_info": self.optional_info,
            }
        )
        return state


def save_hypernetwork(hypernetwork: Hypernetwork, path: str | os.PathLike[str]) -> Path:
    """Write :meth:`Hypernetwork.state_for_a1111` with ``torch.save`` to ``path``, atomically.

    The file is written beside ``path`` under a temporary name and renamed onto it, so a failure
    never leaves a partial file. ``load_hypernetwork(save_hypernetwork(hn, p))`` equals ``hn``
    (fields and tensors; strength is not saved: it is a render setting, not part of the file).
    """
    path = Path(path)
    if path.is_dir():
        raise HypernetworkError(f"{path}: is a folder; give a file name for the hypernetwork")
    state = hypernetwork.state_for_a1111()
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    return path


