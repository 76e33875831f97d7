"""Parents as flat buffers: every parent copied once into one contiguous 1-D tensor.

Layout of a buffer (identical for all parents): the mergeable tensors of MBW block ``BASE``, then
``IN00``, ... in layout order, then each component (``VAE``) on its own; within a block, tensors
keep the order of parent 0's keys. So each block (and component) is one contiguous segment
``[start, end)`` and an elementwise method can merge a whole block with one call. Every segment
starts at a multiple of :data:`SEGMENT_ALIGN` elements and the buffer's length is one (a few
zero-filled padding elements sit after each segment), so that vectorised loads work on every segment, in torch's kernels and in the
fused Triton kernel alike (an unaligned segment makes both fall back to scalar loads).

Not in the buffers (kept aside, copied from parent 0, original dtype): tensors that are not
floating point (int64 ``position_ids``, bool masks) and keys matching
:data:`NON_MERGEABLE_PATTERNS` (``position_ids`` is sometimes stored as float; merging it would
corrupt the token positions). These are never merged by any method.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from optimizer.architectures.layout import BlockLayout
from optimizer.merge.errors import ParentMismatchError

#: Segment starts are multiples of this many elements (128 bytes of fp16, 256 of fp32).
SEGMENT_ALIGN = 64

#: Keys copied from parent 0 even when floating point.
NON_MERGEABLE_PATTERNS: tuple[re.Pattern[str], ...] = (re.compile(r"(^|\.)position_ids$"),)


def is_mergeable(key: str, tensor: Tensor) -> bool:
    """True for floating-point tensors whose key is not in :data:`NON_MERGEABLE_PATTERNS`."""
    return tensor.is_floating_point() and not any(p.search(key) for p in NON_MERGEABLE_PATTERNS)


@dataclass(frozen=True)
class Span:
    """Where one tensor lives in every flat buffer: ``buffer[offset : offset + numel].view(shape)``."""

    key: str
    owner: str  # block or component name
    offset: int
    numel: int
    shape: tuple[int, ...]
    index: int  # position in bank order

    def view(self, flat: Tensor) -> Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.shape)


@dataclass(frozen=True)
class Segment:
    """A block's (or component's) contiguous range ``[start, end)`` and its spans."""

    name: str
    start: int
    end: int
    component: bool
    spans: tuple[Span, ...]

    @property
    def numel(self) -> int:
        return self.end - self.start

    def view(self, flat: Tensor) -> Tensor:
        return flat[self.start : self.end]


class ParentBank:
    """Parents copied into flat buffers on one device, in one dtype. Build with :meth:`build`.

    Attributes: ``buffers`` (one 1-D tensor per parent), ``segments`` (block and component name ->
    :class:`Segment`; blocks in MBW order, then components), ``spans`` (every flat tensor, in
    buffer order), ``passthrough`` (key -> tensor copied from parent 0, not in the buffers),
    ``keys`` (all keys, in parent 0's order), ``layout``, ``dtype``, ``device``.
    """

    def __init__(
        self,
        *,
        buffers: Sequence[Tensor],
        layout: BlockLayout,
        segments: Mapping[str, Segment],
        passthrough: Mapping[str, Tensor],
        keys: Sequence[str],
        device: torch.device | None = None,
        placement: str = "device",
    ) -> None:
        self.buffers = tuple(buffers)
        self.layout = layout
        self.segments = dict(segments)
        self.spans = tuple(span for seg in self.segments.values() for span in seg.spans)
        self.passthrough = dict(passthrough)
        self.keys = tuple(keys)
        self.dtype = self.buffers[0].dtype
        #: where merges run and the output lives; the parent buffers are there too unless ``placement == "host"``
        self.device = torch.device(device) if device is not None else self.buffers[0].device
        self.placement = placement
        self.numel = self.buffers[0].numel()

    def __repr__(self) -> str:
        gib = self.numel * self.buffers[0].element_size() / 2**30
        where = f"{self.device}" if self.placement == "device" else f"host -> {self.device}"
        return f"ParentBank({self.layout.name}, {self.n_parents} parents, {self.numel:,} elements ({gib:.2f} GiB each), {self.dtype}, {where})"

    @property
    def n_parents(self) -> int:
        return len(self.buffers)

    def equal_segments(self, *, names: Sequence[str] | None = None) -> list[str]:
        """Those of ``names`` (default: every block and component) whose tensors are identical in
        every parent (exact equality; such a segment merges to itself whatever the recipe)."""
        first = self.buffers[0]
        wanted = self.segments if names is None else [n for n in names if n in self.segments]
        return [name for name in wanted
                if all(torch.equal(self.segments[name].view(first), self.segments[name].view(other)) for other in self.buffers[1:])]

    @classmethod
    def build(
        cls,
        *,
        state_dicts: Sequence[Mapping[str, Tensor]],
        layout: BlockLayout,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        placement: str = "device",
    ) -> ParentBank:
        """Check that the parents match, then copy each one once into a flat buffer on ``device``.

        ``placement="host"`` keeps the buffers in host memory (pinned when ``device`` is CUDA) and
        merges stream them to ``device`` segment by segment (:mod:`optimizer.merge.streaming`).

        ``dtype`` defaults to the promoted dtype of all mergeable tensors of all parents (the
        common dtype when they agree). The state dicts are not kept: the caller may drop them.
        Raises :class:`ParentMismatchError` naming the key and parent on any key/shape mismatch,
        and :class:`~optimizer.architectures.LayoutError` for keys the layout does not own.
        """
        if not state_dicts:
            raise ParentMismatchError("no parents given")
        first = state_dicts[0]
        _check_same_keys_and_shapes(state_dicts)
        assignment = layout.assign(first.keys())

        mergeable = [k for k in first if is_mergeable(k, first[k])]
        if dtype is None:
            dtype = _common_dtype(state_dicts, mergeable)
        elif not dtype.is_floating_point:
            raise ParentMismatchError(f"bank dtype must be floating point, got {dtype}")
        device = torch.device(device)
        if placement not in ("device", "host"):
            raise ParentMismatchError(f"bank placement must be 'device' or 'host', got {placement!r}")
        home = device if placement == "device" else torch.device("cpu")
        pin = placement == "host" and device.type == "cuda"

        by_owner: dict[str, list[str]] = {name: [] for name in (*layout.blocks, *layout.components)}
        for key in mergeable:
            by_owner[assignment.owner[key]].append(key)
        segments: dict[str, Segment] = {}
        offset = index = 0
        for name, keys in by_owner.items():
            offset = -(-offset // SEGMENT_ALIGN) * SEGMENT_ALIGN
            start = offset
            spans = []
            for key in keys:
                shape = tuple(first[key].shape)
                numel = first[key].numel()
                spans.append(Span(key=key, owner=name, offset=offset, numel=numel, shape=shape, index=index))
                offset += numel
                index += 1
            segments[name] = Segment(name=name, start=start, end=offset, component=name in layout.components, spans=tuple(spans))
        offset = -(-offset // SEGMENT_ALIGN) * SEGMENT_ALIGN  # the buffer ends aligned too

        buffers = []
        with torch.no_grad():
            for sd in state_dicts:
                buf = torch.zeros(offset, dtype=dtype, device=home, pin_memory=pin)  # zeros: the padding is defined
                for seg in segments.values():
                    for span in seg.spans:
                        span.view(buf).copy_(sd[span.key])
                buffers.append(buf)
            merged = set(mergeable)
            passthrough = {k: first[k].detach().to(device=device, copy=True) for k in first if k not in merged}
        return cls(buffers=buffers, layout=layout, segments=segments, passthrough=passthrough, keys=list(first),
                   device=device, placement=placement)


def _check_same_keys_and_shapes(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    first = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        missing = [k for k in first if k not in sd]
        if missing:
            raise ParentMismatchError(f"parent {i} lacks {len(missing)} key(s) of parent 0: {_few(missing)}")
        extra = [k for k in sd if k not in first]
        if extra:
            raise ParentMismatchError(f"parent {i} has {len(extra)} key(s) that parent 0 lacks: {_few(extra)}")
        for k, t in first.items():
            if tuple(sd[k].shape) != tuple(t.shape):
                raise ParentMismatchError(f"key {k!r}: parent {i} has shape {tuple(sd[k].shape)}, parent 0 has {tuple(t.shape)}")
            if sd[k].is_floating_point() != t.is_floating_point():  # a float merged with an integer tensor, either way round
                raise ParentMismatchError(f"key {k!r}: parent {i} has dtype {sd[k].dtype}, parent 0 has {t.dtype}")


def _common_dtype(state_dicts: Sequence[Mapping[str, Tensor]], keys: Sequence[str]) -> torch.dtype:
    seen = {sd[k].dtype for sd in state_dicts for k in keys}
    if not seen:
        return torch.float32
    dtype = seen.pop()
    for other in seen:
        dtype = torch.promote_types(dtype, other)
    return dtype


def _few(keys: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
