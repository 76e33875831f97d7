"""Key rules: an architecture record's table from canonical denoiser keys to diffusers keys.

A rule (see ``_KeyRule`` in :mod:`optimizer.architectures.layout`) full-matches one canonical key
(without the module prefix) and names its diffusers key(s) with ``\\1``-style references:

* ``rename``: the same tensor under the new name;
* ``split``: dim 0 cut into ``len(to)`` parts in proportion to ``ratios`` (default equal), each a
  **view** of the canonical tensor (``narrow``) -- fused q/k/v stay views of the merge buffer;
* ``swap_halves``: the two halves of dim 0 exchanged: a new tensor (``cat``), the only kind the
  render binding has to refresh after each merge.

:func:`to_diffusers` applies the rules; :func:`from_diffusers` is the exact inverse (``split``
parts concatenated in order, ``swap_halves`` swapped back). Both raise :class:`KeyRuleError`
naming the key for a key no rule matches, two keys naming one tensor, an incomplete split, or a
dimension a split cannot divide. Match patterns are literal text (``\\.`` for a dot) and groups
only, so each rule can be run backwards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from optimizer.checkpoint.types import CheckpointError

__all__ = ["KeyRuleError", "KeyRules"]


class KeyRuleError(CheckpointError):
    """A key cannot be converted by the architecture's key rules."""


_GROUP_REF = re.compile(r"\\(\d)")


def _parse_match(pattern: str) -> tuple[list[str], list[str]]:
    """Split a match pattern into literal pieces and group sub-patterns:
    ``'a\\.(\\d+)\\.b'`` -> (['a.', '.b'], ['\\d+']). Only escapes and un-nested groups are allowed."""
    literals, groups = [""], []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            literals[-1] += pattern[i + 1]
            i += 2
        elif c == "(":
            depth, j = 1, i + 1
            while depth:
                if j >= len(pattern):
                    raise KeyRuleError(f"key rule {pattern!r}: unbalanced group")
                depth += {"(": 1, ")": -1}.get(pattern[j], 0)
                j += 1
            inner = pattern[i + 1 : j - 1]
            if "(" in inner:
                raise KeyRuleError(f"key rule {pattern!r}: nested groups cannot be run backwards")
            groups.append(inner)
            literals.append("")
            i = j
        elif c in ".*+?[]{}|^$":
            raise KeyRuleError(f"key rule {pattern!r}: only literal text (escape dots) and groups can be run backwards")
        else:
            literals[-1] += c
            i += 1
    return literals, groups


@dataclass(frozen=True)
class _Compiled:
    forward: re.Pattern[str]
    source: tuple[list[str], list[str]]  # literal pieces and group patterns of the canonical key
    targets: tuple[str, ...]
    backward: tuple[re.Pattern[str], ...]  # one per target: diffusers key -> group values
    backward_order: tuple[tuple[int, ...], ...]  # group numbers in the order they appear in each target
    op: str
    ratios: tuple[int, ...]

    def canonical(self, values: Mapping[int, str]) -> str:
        literals, groups = self.source
        out = literals[0]
        for n in range(len(groups)):
            out += values[n + 1] + literals[n + 1]
        return out


def _compile(rule) -> _Compiled:
    literals, groups = _parse_match(rule.match)
    backward, orders = [], []
    for target in rule.to:
        parts, order, last = [], [], 0
        for m in _GROUP_REF.finditer(target):
            n = int(m.group(1))
            if not 1 <= n <= len(groups):
                raise KeyRuleError(f"key rule {rule.match!r}: target {target!r} refers to group {n}, the match has {len(groups)}")
            parts.append(re.escape(target[last : m.start()]))
            parts.append(f"({groups[n - 1]})")
            order.append(n)
            last = m.end()
        parts.append(re.escape(target[last:]))
        if sorted(set(order)) != list(range(1, len(groups) + 1)):
            raise KeyRuleError(f"key rule {rule.match!r}: target {target!r} must use every group once to be reversible")
        backward.append(re.compile("".join(parts)))
        orders.append(tuple(order))
    ratios = tuple(rule.ratios) or (1,) * len(rule.to)
    return _Compiled(re.compile(rule.match), (literals, groups), tuple(rule.to), tuple(backward), tuple(orders), rule.op, ratios)


def _swap_halves(tensor: Tensor, key: str) -> Tensor:
    if tensor.shape[0] % 2:
        raise KeyRuleError(f"{key}: cannot swap the halves of dim 0 of shape {tuple(tensor.shape)}")
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class KeyRules:
    """Compiled key rules of one architecture record (see the module docstring)."""

    def __init__(self, rules: Sequence) -> None:
        self._rules = [_compile(r) for r in rules]

    def _rule_of(self, key: str) -> tuple[_Compiled, re.Match[str]]:
        for rule in self._rules:
            m = rule.forward.fullmatch(key)
            if m:
                return rule, m
        raise KeyRuleError(f"no key rule converts {key!r}")

    def to_diffusers(self, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
        """``(diffusers state dict, {new diffusers key: its canonical key})``: renames are the
        same tensor objects, split parts views, swapped tensors new (listed in the second value)."""
        out: dict[str, Tensor] = {}
        origin: dict[str, str] = {}
        new: dict[str, str] = {}

        def put(name: str, tensor: Tensor, key: str) -> None:
            if name in out:
                raise KeyRuleError(f"keys {origin[name]!r} and {key!r} both convert to {name!r}")
            out[name] = tensor
            origin[name] = key

        for key, tensor in state_dict.items():
            rule, m = self._rule_of(key)
            names = [m.expand(t) for t in rule.targets]
            if rule.op == "rename":
                put(names[0], tensor, key)
            elif rule.op == "swap_halves":
                put(names[0], _swap_halves(tensor, key), key)
                new[names[0]] = key
            else:
                total = sum(rule.ratios)
                if tensor.shape[0] % total:
                    raise KeyRuleError(f"{key}: dim 0 of shape {tuple(tensor.shape)} does not split in ratios {list(rule.ratios)}")
                unit = tensor.shape[0] // total
                start = 0
                for name, ratio in zip(names, rule.ratios, strict=True):
                    put(name, tensor.narrow(0, start, unit * ratio), key)
                    start += unit * ratio
        return out, new

    def from_diffusers(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The canonical state dict of a diffusers one (the inverse of :meth:`to_diffusers`)."""
        out: dict[str, Tensor] = {}
        parts: dict[str, tuple[_Compiled, dict[int, Tensor], dict[int, str]]] = {}
        for key, tensor in state_dict.items():
            for rule in self._rules:
                found = None
                for j, pattern in enumerate(rule.backward):
                    m = pattern.fullmatch(key)
                    if m:
                        values = {n: m.group(i + 1) for i, n in enumerate(rule.backward_order[j])}
                        canonical = rule.canonical(values)
                        if rule.forward.fullmatch(canonical):  # e.g. a last-block rule's literal index
                            found = (j, canonical)
                            break
                if found is None:
                    continue
                j, canonical = found
                if rule.op == "split":
                    _, pieces, names = parts.setdefault(canonical, (rule, {}, {}))
                    if j in pieces:
                        raise KeyRuleError(f"keys {names[j]!r} and {key!r} are the same part of {canonical!r}")
                    pieces[j], names[j] = tensor, key
                else:
                    if canonical in out:
                        raise KeyRuleError(f"two diffusers keys convert to {canonical!r} (one is {key!r})")
                    out[canonical] = tensor if rule.op == "rename" else _swap_halves(tensor, key)
                break
            else:
                raise KeyRuleError(f"no key rule converts the diffusers key {key!r}")
        for canonical, (rule, pieces, names) in parts.items():
            missing = [rule.forward.fullmatch(canonical).expand(rule.targets[j]) for j in range(len(rule.targets)) if j not in pieces]
            if missing:
                raise KeyRuleError(f"{canonical!r} is stored split: missing {missing} next to {next(iter(names.values()))!r}")
            tensors = [pieces[j] for j in range(len(rule.targets))]
            unit = tensors[0].shape[0] // rule.ratios[0]
            if any(t.shape[0] != unit * r or t.shape[1:] != tensors[0].shape[1:] for t, r in zip(tensors, rule.ratios, strict=True)):
                raise KeyRuleError(f"the parts of {canonical!r} have shapes {[tuple(t.shape) for t in tensors]}, not ratios {list(rule.ratios)}")
            out[canonical] = torch.cat(tensors, dim=0)
        return out
