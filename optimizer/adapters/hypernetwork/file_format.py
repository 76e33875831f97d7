"""Reading A1111 hypernetwork files safely (``torch.load(weights_only=True)``) into :class:`Hypernetwork` objects, strictly."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from optimizer.adapters.hypernetwork.modules import Hypernetwork, HypernetworkModule, _moved
from optimizer.adapters.hypernetwork.structure import (
    _DEFAULT_LAYER_STRUCTURE,
    _OLD_KEYS,
    _SHOW,
    HypernetworkError,
    HypernetworkFileNotFoundError,
    HypernetworkStructure,
    _check_layer_structure,
    _is_number,
    _listing,
    parse_dropout_structure,
)
from optimizer.checkpoint.safe_read import unpickler_reason


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


