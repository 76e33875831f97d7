"""AUTOMATIC1111 hypernetworks: loaded safely, applied to a diffusers UNet with strengths, several at once.

File format (A1111's ``modules/hypernetworks/hypernetwork.py``, a ``torch.save``'d dict):

* ``int`` keys are context widths (768, 320, 640, 1280 for SD1.x; 64 and 32 for the zoo models)
  -> ``[key-module state dict, value-module state dict]`` (a list or tuple of two);
* other keys describe the modules: ``layer_structure`` (width multipliers, first and last 1,
  default ``[1, 2, 1]``), ``activation_func`` (default none, i.e. ``'linear'``), ``is_layer_norm``
  (default false), ``activate_output`` (default **true** when loading a file, as in A1111: files
  older than the field activated every layer; false for :meth:`Hypernetwork.new`, as A1111's
  "Create hypernetwork"), ``dropout_structure`` (absent in old files: derived from ``use_dropout``
  and ``last_layer_dropout``, both default false, with A1111's ``parse_dropout_structure``), and
  metadata kept for a faithful re-save (``name``, ``step``, ``weight_initialization``,
  ``sd_checkpoint``, ``sd_checkpoint_name``, ``optional_info``). Anything else (optimizer state)
  is ignored.

Each module is ``torch.nn.Sequential`` named ``linear``: for every pair of consecutive widths
``w_i = int(dim * layer_structure[i])``, a ``Linear(w_i, w_{i+1})``, then the activation (not after
the last Linear unless ``activate_output``; never for ``'linear'``), then ``LayerNorm(w_{i+1})`` if
``is_layer_norm``, then ``Dropout(p)`` if ``dropout_structure[i+1] > 0``. So a file's keys are
``linear.<index in that Sequential>.weight`` / ``.bias`` (activation and dropout layers take
indices too). The oldest files' ``linear1.*`` / ``linear2.*`` keys are renamed to ``linear.0.*`` /
``linear.1.*`` as A1111 does. Loading is strict: every tensor must land on a parameter of the
module built from the file's own fields, with the right shape; otherwise
:class:`HypernetworkError` names the file, the width, the module and the offending keys.

Files are read with ``torch.load(weights_only=True)`` only: a file whose pickle needs anything
beyond tensors and plain containers is refused, never executed.

Math. A module of width ``dim`` maps a context ``x`` (last dimension ``dim``) to
``x + strength * mlp(x)``, with ``strength`` the hypernetwork's :attr:`Hypernetwork.strength`
(A1111's multiplier), in training and in inference alike (A1111 forces 1 while training; here a
training run sets its strength itself, 1.0 by default). ``strength == 0`` returns ``x`` itself (the
MLP is not run), so a zero strength is bit-identical to no hypernetwork. The MLP runs in the
module's dtype: ``x`` is cast to it and the residual cast back to ``x``'s dtype, so a float32
hypernetwork works on a float16 UNet.

In every attention layer, with ``context`` the encoder hidden states (cross-attention) or the
hidden states themselves (self-attention), each hypernetwork of a :class:`HypernetworkStack`, in
order, that has a module pair for ``context.shape[-1]`` maps ``context_k <- k_module(context_k)``
and ``context_v <- v_module(context_v)`` (both chains start at ``context``); then
``key = to_k(context_k)``, ``value = to_v(context_v)``; the query is unchanged. This is A1111's
``apply_hypernetworks`` (several hypernetworks as in the sd-webui-multiple-hypernetworks extension).

Installation uses diffusers' public ``set_attn_processor``: :func:`install_hypernetworks` puts one
:class:`HypernetworkAttnProcessor` (the math of ``AttnProcessor2_0`` with the key/value context
above) on every attention layer; :func:`remove_hypernetworks` puts ``AttnProcessor2_0`` back. The
processor is a plain object, not a module, so the hypernetwork parameters stay out of the UNet's
``state_dict`` and ``parameters()``: move (``stack.to(...)``) and switch modes (``stack.train()``)
on the stack itself. Strengths are read at every call: change them between trials with
:meth:`HypernetworkStack.set_strengths`, without reinstalling.

Modes: hypernetworks are created and loaded in eval mode with ``requires_grad`` off, as in A1111;
``train()`` turns gradients on (and dropout), ``eval()`` off again.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from optimizer.atomic import write_atomic
from optimizer.checkpoint.safe_read import unpickler_reason
from optimizer.errors import EvomergeError

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
    "HypernetworkError",
    "HypernetworkFileNotFoundError",
    "HypernetworkModule",
    "HypernetworkStack",
    "HypernetworkStructure",
    "hypernetwork_from_state",
    "install_hypernetworks",
    "load_hypernetwork",
    "parse_dropout_structure",
    "remove_hypernetworks",
    "save_hypernetwork",
]

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


# --------------------------------------------------------------------------------------------
# modules


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


# --------------------------------------------------------------------------------------------
# loading


def _unreadable(path: Path, detail: object) -> HypernetworkError:
    return HypernetworkError(f"{path}: not a readable torch file ({path.stat().st_size} bytes; truncated or corrupt?): {detail}")


def _read(path: Path) -> object:
    from optimizer.checkpoint.safe_read import check_weight_file

    check_weight_file(path, error=HypernetworkError)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = unpickler_reason(exc)
        if "global" not in reason.lower():  # e.g. "Unsupported operand 103": not a pickle at all
            raise _unreadable(path, reason) from exc
        raise HypernetworkError(
            f"{path}: not a safe hypernetwork file: its pickle needs Python objects beyond tensors and plain "
            f"containers, which evomerge never unpickles (torch.load weights_only=True said: {reason})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - unpickling arbitrary bytes raises anything (IndexError, KeyError, ...)
        raise _unreadable(path, str(exc) or type(exc).__name__) from exc


def _flag(state: Mapping[Any, Any], field: str, default: bool) -> bool:
    """A boolean field: absent -> ``default``; ``None`` -> false (A1111 tests truthiness)."""
    value = state.get(field, default)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise HypernetworkError(f"{field} must be true or false, not {value!r}")


def _structure_from_state(state: Mapping[Any, Any]) -> HypernetworkStructure:
    """The structure a file describes, with A1111's defaults for absent fields (module docstring)."""
    raw_layers = state.get("layer_structure")
    layer_structure = _DEFAULT_LAYER_STRUCTURE if raw_layers is None else _check_layer_structure(raw_layers)
    activation = state.get("activation_func")
    dropout = state.get("dropout_structure")
    if dropout is None:
        dropout = parse_dropout_structure(
            layer_structure=layer_structure,
            use_dropout=_flag(state, "use_dropout", False),
            last_layer_dropout=_flag(state, "last_layer_dropout", False),
        )
    return HypernetworkStructure(
        layer_structure=layer_structure,
        activation="linear" if activation is None else activation,
        layer_norm=_flag(state, "is_layer_norm", False),
        activate_output=_flag(state, "activate_output", True),
        dropout_structure=dropout,
    )


def _no_layers_message(state: Mapping[Any, Any], source: str) -> str:
    keys = [repr(k) for k in list(state)[: _SHOW + 1]]
    message = (
        f"{source}: not an A1111 hypernetwork: no integer keys (context widths such as 768) holding "
        f"[key, value] module state dicts; its {len(state)} key(s): {_listing(keys) or 'none'}"
    )
    if any(isinstance(k, str) and k.isdigit() for k in state):
        message += " (widths stored as strings: A1111 needs integer keys)"
    return message


def _load_module(state_dict: Mapping[Any, Any], *, dim: int, structure: HypernetworkStructure, where: str) -> HypernetworkModule:
    """A module of width ``dim`` holding ``state_dict`` (old key names renamed), strictly checked."""
    tensors = dict(state_dict)
    for old, new in _OLD_KEYS.items():
        if old in tensors:
            tensors[new] = tensors.pop(old)
    try:
        with torch.device("meta"):  # shapes only: no time spent on a random initialisation
            module = HypernetworkModule(dim, structure)
    except HypernetworkError as exc:
        raise HypernetworkError(f"{where}: {exc}") from None
    expected = {key: tuple(t.shape) for key, t in module.state_dict().items()}
    not_tensors = sorted(
        f"{key} ({type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype})"
        for key, v in tensors.items()
        if key in expected and not (isinstance(v, torch.Tensor) and v.is_floating_point())
    )
    unexpected = sorted(str(key) for key in tensors if key not in expected)
    missing = sorted(key for key in expected if key not in tensors)
    mismatched = [
        f"{key} {tuple(tensors[key].shape)} (expected {shape})"
        for key, shape in expected.items()
        if isinstance(tensors.get(key), torch.Tensor) and tuple(tensors[key].shape) != shape
    ]
    if not_tensors or unexpected or missing or mismatched:
        lines = [f"{where}: state dict does not match the module its file describes ({structure.describe()}):"]
        if missing:
            lines.append(f"  missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  wrong shape for {len(mismatched)} key(s): {_listing(mismatched)}")
        if not_tensors:
            lines.append(f"  not floating-point tensors: {_listing(not_tensors)}")
        raise HypernetworkError("\n".join(lines))
    module.to_empty(device="cpu")
    module.load_state_dict(tensors, strict=True)
    return module


def _file_dtype(pairs: Iterable[object]) -> torch.dtype:
    """The one floating dtype of a file's tensors (float32 if they differ or there are none)."""
    dtypes = {
        t.dtype
        for entry in pairs
        if isinstance(entry, (list, tuple))
        for sd in entry
        if isinstance(sd, Mapping)
        for t in sd.values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    }
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _optional_str(state: Mapping[Any, Any], field: str) -> str | None:
    value = state.get(field)
    return None if value is None else str(value)


def hypernetwork_from_state(
    state: object,
    *,
    source: str = "<state dict>",
    default_name: str = "hypernetwork",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Hypernetwork:
    """A :class:`Hypernetwork` from an A1111 hypernetwork dict (what ``torch.load`` returns).

    Structure fields default as A1111 (module docstring); ``name`` defaults to ``default_name``.
    ``dtype``: default the file's tensor dtype (float32 when mixed). Raises
    :class:`HypernetworkError` naming ``source`` and the field, width (``layer 768``), module
    (``key`` / ``value``) and keys at fault.
    """
    if not isinstance(state, Mapping):
        raise HypernetworkError(f"{source}: not an A1111 hypernetwork: it holds a {type(state).__name__}, not a dict")
    dims = [k for k in state if isinstance(k, int) and not isinstance(k, bool)]
    if not dims:
        raise HypernetworkError(_no_layers_message(state, source))
    try:
        structure = _structure_from_state(state)
    except HypernetworkError as exc:
        raise HypernetworkError(f"{source}: {exc}") from None
    pairs: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for dim in dims:
        entry = state[dim]
        if dim < 1:
            raise HypernetworkError(f"{source}: layer {dim}: a context width must be positive")
        if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not all(isinstance(sd, Mapping) for sd in entry):
            shape = f"a {type(entry).__name__}" + (f" of {len(entry)}" if isinstance(entry, (list, tuple)) else "")
            raise HypernetworkError(f"{source}: layer {dim}: expected [key state dict, value state dict], got {shape}")
        k_state, v_state = entry
        pairs[dim] = (
            _load_module(k_state, dim=dim, structure=structure, where=f"{source}: layer {dim} key module"),
            _load_module(v_state, dim=dim, structure=structure, where=f"{source}: layer {dim} value module"),
        )
    name = state.get("name")
    step = state.get("step")
    hypernetwork = Hypernetwork(
        name=name if isinstance(name, str) and name else default_name,
        structure=structure,
        pairs=pairs,
        weight_init=str(state.get("weight_initialization") or "Normal"),
        step=int(step) if _is_number(step) else 0,
        sd_checkpoint=_optional_str(state, "sd_checkpoint"),
        sd_checkpoint_name=_optional_str(state, "sd_checkpoint_name"),
        optional_info=_optional_str(state, "optional_info"),
    )
    _moved(hypernetwork, device=device, dtype=dtype if dtype is not None else _file_dtype(state[d] for d in dims))
    return hypernetwork


def load_hypernetwork(
    path: str | os.PathLike[str], *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Hypernetwork:
    """Load an A1111 hypernetwork ``.pt`` file with ``torch.load(weights_only=True)``, strictly.

    In eval mode, strength 1.0, on ``device`` (default CPU) in ``dtype`` (default the file's);
    ``name`` is the file's ``name`` field, else the file stem. Raises
    :class:`HypernetworkFileNotFoundError` for a missing file and :class:`HypernetworkError` for an
    unsafe pickle, an unreadable file or a dict that is not a valid hypernetwork (see
    :func:`hypernetwork_from_state`).
    """
    path = Path(path)
    if not path.is_file():
        raise HypernetworkFileNotFoundError(f"hypernetwork file not found: {path}")
    return hypernetwork_from_state(_read(path), source=str(path), default_name=path.stem, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# several at once


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


# --------------------------------------------------------------------------------------------
# diffusers attention


class HypernetworkAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with the key and value computed from ``stack``'s contexts.

    Same steps as ``AttnProcessor2_0`` (spatial norm, 4-D input flattening, attention mask,
    group norm, ``norm_cross``, ``norm_q`` / ``norm_k``, ``scaled_dot_product_attention``, output
    projection and dropout, residual connection, ``rescale_output_factor``), except
    ``key = to_k(stack.apply_k(context))`` and ``value = to_v(stack.apply_v(context))``, with
    ``context`` the (normalised) encoder hidden states, or the hidden states for self-attention.
    With no hypernetwork matching the width (or all strengths 0) the result is bit-identical to
    ``AttnProcessor2_0``. A plain object, not a module: the stack is not registered in the UNet.
    Extra positional / keyword arguments (diffusers' deprecated ``scale``) are ignored.
    """

    def __init__(self, stack: HypernetworkStack) -> None:
        if not isinstance(stack, HypernetworkStack):
            raise TypeError(f"stack must be a HypernetworkStack, not {type(stack).__name__}")
        self.stack = stack

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        context_k, context_v = self.stack(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _processors(unet: nn.Module) -> dict[str, Any]:
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"{type(unet).__name__} is not a diffusers model with attention processors")
    return dict(unet.attn_processors)


def install_hypernetworks(unet: nn.Module, stack: HypernetworkStack) -> int:
    """Make every attention layer of ``unet`` apply ``stack``; returns the number of layers.

    Uses ``unet.set_attn_processor`` with one shared :class:`HypernetworkAttnProcessor`. Each
    layer must currently use diffusers' ``AttnProcessor2_0`` (the default) or a
    :class:`HypernetworkAttnProcessor` (reinstalling replaces the stack); any other processor
    (xformers, fused QKV, IP-Adapter, ...) raises :class:`ValueError` rather than being dropped.
    Later strength changes on ``stack`` need no reinstall.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    current = _processors(unet)
    if not current:
        raise ValueError(f"{type(unet).__name__} has no attention layers to apply hypernetworks to")
    foreign = [
        f"{name} ({type(p).__name__})"
        for name, p in current.items()
        if type(p) is not AttnProcessor2_0 and not isinstance(p, HypernetworkAttnProcessor)
    ]
    if foreign:
        raise ValueError(
            f"cannot install hypernetworks: {len(foreign)} attention layer(s) use a processor other than "
            f"diffusers' AttnProcessor2_0, which installing would drop: {_listing(foreign)}"
        )
    processor = HypernetworkAttnProcessor(stack)
    unet.set_attn_processor(dict.fromkeys(current, processor))
    return len(current)


def remove_hypernetworks(unet: nn.Module) -> int:
    """Put ``AttnProcessor2_0`` back on every layer that has a :class:`HypernetworkAttnProcessor`;
    returns how many layers changed (other processors are left alone)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    current = _processors(unet)
    ours = [name for name, p in current.items() if isinstance(p, HypernetworkAttnProcessor)]
    if ours:
        unet.set_attn_processor(
            {name: AttnProcessor2_0() if isinstance(p, HypernetworkAttnProcessor) else p for name, p in current.items()}
        )
    return len(ours)
