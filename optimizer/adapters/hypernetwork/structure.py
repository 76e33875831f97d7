"""Hypernetwork structure: the A1111 fields (layer_structure, activation, norms, dropout) validated, and the errors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from optimizer.errors import EvomergeError

_SHOW = 12  # keys listed per category in an error message
_DEFAULT_LAYER_STRUCTURE = (1, 2, 1)
_A1111_DROPOUT = 0.3  # A1111's dropout probability for files that only say use_dropout
_OLD_KEYS = {  # A1111's fix_old_state_dict: the first files had two named Linear layers
    "linear1.bias": "linear.0.bias",
    "linear1.weight": "linear.0.weight",
    "linear2.bias": "linear.1.bias",
    "linear2.weight": "linear.1.weight",
}
# torch.nn activation classes A1111's table includes that cannot work here: Threshold and
# MultiheadAttention need constructor arguments, GLU halves the width (the next Linear fails).
_UNUSABLE_ACTIVATIONS = ("threshold", "multiheadattention", "glu")


def _activation_table() -> dict[str, type[nn.Module]]:
    """A1111's ``HypernetworkModule.activation_dict``: seven named entries, then every class of
    ``torch.nn.modules.activation`` by lowercased class name (``'gelu'``, ``'mish'``, ``'silu'``, ...)."""
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,  # sic: A1111's "swish" is Hardswish (use "silu" for x * sigmoid(x))
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    module = torch.nn.modules.activation
    for cls_name, obj in sorted(vars(module).items()):
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
            table[cls_name.lower()] = obj
    for name in _UNUSABLE_ACTIVATIONS:
        table.pop(name, None)
    return table


#: ``activation_func`` value -> activation module class (A1111's table, less unusable entries)
ACTIVATIONS: Mapping[str, type[nn.Module]] = MappingProxyType(_activation_table())

#: A1111's ``weight_initialization`` names, for :meth:`Hypernetwork.new`
WEIGHT_INITS: tuple[str, ...] = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


class HypernetworkError(EvomergeError, ValueError):
    """A hypernetwork file or structure is unreadable, unsafe or inconsistent."""


class HypernetworkFileNotFoundError(HypernetworkError, FileNotFoundError):
    """A hypernetwork file does not exist (both a :class:`HypernetworkError` and a :class:`FileNotFoundError`)."""


# --------------------------------------------------------------------------------------------
# structure


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _number_list(value: object, field: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise HypernetworkError(f"{field} must be a list of numbers, not {value!r}")
    items = tuple(value)
    if not all(_is_number(x) for x in items):
        raise HypernetworkError(f"{field} must be a list of finite numbers, got {list(items)!r}")
    return items


def _check_layer_structure(value: object) -> tuple[float, ...]:
    items = _number_list(value, "layer_structure")
    if len(items) < 2 or any(x <= 0 for x in items):
        raise HypernetworkError(f"layer_structure must hold at least 2 positive width multipliers, got {list(items)!r}")
    if items[0] != 1 or items[-1] != 1:
        raise HypernetworkError(f"layer_structure must start and end with 1 (the context width), got {list(items)!r}")
    return items


def _check_dropout_structure(value: object, n_layers: int) -> tuple[float, ...]:
    items = _number_list(value, "dropout_structure")
    if len(items) != n_layers:
        raise HypernetworkError(
            f"dropout_structure must have one entry per layer_structure entry ({n_layers}), got {list(items)!r}"
        )
    if any(not 0 <= p < 1 for p in items):
        raise HypernetworkError(f"dropout_structure entries must be probabilities in [0, 1), got {list(items)!r}")
    return items


def parse_dropout_structure(
    *, layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> tuple[float, ...]:
    """A1111's ``parse_dropout_structure`` for files without a ``dropout_structure`` field.

    Without ``use_dropout``: all zeros. With it: ``0``, then ``0.3`` for every hidden layer but
    the last, then ``0.3`` if ``last_layer_dropout`` else ``0``, then ``0`` (cut to
    ``len(layer_structure)`` entries: A1111's list is one too long for a 2-entry structure, whose
    only used entry, index 1, it keeps).
    """
    n = len(layer_structure)
    if not use_dropout:
        return (0,) * n
    values = [0.0, *[_A1111_DROPOUT] * (n - 3), _A1111_DROPOUT if last_layer_dropout else 0.0, 0.0]
    return tuple(values[:n])


@dataclass(frozen=True)
class HypernetworkStructure:
    """The architecture shared by every module of one hypernetwork (A1111 file field in brackets).

    * ``layer_structure`` [``layer_structure``]: width multipliers, first and last 1;
    * ``activation`` [``activation_func``]: a key of :data:`ACTIVATIONS` (``'linear'``: none);
    * ``layer_norm`` [``is_layer_norm``]: a LayerNorm after every Linear;
    * ``activate_output`` [``activate_output``]: the activation also follows the last Linear;
    * ``dropout_structure`` [``dropout_structure``]: dropout probability after each Linear
      (entry ``i + 1`` follows Linear ``i``; entry 0 is unused); ``None`` means no dropout and is
      stored as zeros. Dropout only acts in train mode.

    Invalid values raise :class:`HypernetworkError` naming the A1111 field.
    """

    layer_structure: tuple[float, ...] = _DEFAULT_LAYER_STRUCTURE
    activation: str = "linear"
    layer_norm: bool = False
    activate_output: bool = False
    dropout_structure: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        layer_structure = _check_layer_structure(self.layer_structure)
        object.__setattr__(self, "layer_structure", layer_structure)
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise HypernetworkError(
                f"activation_func {self.activation!r} is not a known activation; known: {', '.join(sorted(ACTIVATIONS))}"
            )
        for attribute, field in (("layer_norm", "is_layer_norm"), ("activate_output", "activate_output")):
            if not isinstance(getattr(self, attribute), bool):
                raise HypernetworkError(f"{field} must be true or false, not {getattr(self, attribute)!r}")
        dropout = (
            (0,) * len(layer_structure)
            if self.dropout_structure is None
            else _check_dropout_structure(self.dropout_structure, len(layer_structure))
        )
        object.__setattr__(self, "dropout_structure", dropout)

    def widths(self, dim: int) -> list[int]:
        """Layer widths for context width ``dim``: ``int(dim * m)`` for each multiplier ``m`` (as A1111)."""
        widths = [int(dim * m) for m in self.layer_structure]
        if min(widths) < 1:
            raise HypernetworkError(
                f"layer_structure {list(self.layer_structure)} gives a layer of width 0 for dim {dim}: {widths}"
            )
        return widths

    def layers(self, dim: int) -> list[nn.Module]:
        """The modules of A1111's ``HypernetworkModule.linear`` for width ``dim``, in order (see the module docstring)."""
        widths = self.widths(dim)
        last = len(widths) - 2
        dropout = self.dropout_structure or ()
        layers: list[nn.Module] = []
        for i in range(len(widths) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if self.activation != "linear" and (i < last or self.activate_output):
                layers.append(ACTIVATIONS[self.activation]())
            if self.layer_norm:
                layers.append(nn.LayerNorm(widths[i + 1]))
            if dropout[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout[i + 1]))
        return layers

    def describe(self) -> str:
        """The structure in A1111 field names, for messages."""
        return (
            f"layer_structure {list(self.layer_structure)}, activation_func {self.activation!r}, "
            f"is_layer_norm {self.layer_norm}, activate_output {self.activate_output}, "
            f"dropout_structure {list(self.dropout_structure or ())}"
        )


