"""Streaming parents from host memory: for parents too big to keep on the device (Flux.1: ~24 GB
per parent in bf16; two parents plus the output do not fit most GPUs).

A bank built with ``placement="host"`` keeps the parent buffers in (pinned, when the device is
CUDA) host memory; the merge output stays on the device. Per merge, :class:`SegmentStager` copies
each block segment of every parent into a device staging slot and the merge method reads the slot:
two slots, so that on CUDA the host-to-device copy of the next segment (on a side stream) overlaps
the merge of this one. Device memory: the output plus ``2 * n_parents * (largest segment)``.

Contract: a merge from a host bank gives exactly the weights of the same merge from a device bank
(the methods see the same values, on the same device, in the same order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from optimizer.merge.flat import ParentBank, Segment

__all__ = ["SegmentStager"]


class SegmentStager:
    """Yields ``(segment, [parent views on the device])`` for segments of a host bank, prefetching."""

    def __init__(self, bank: ParentBank) -> None:
        self.bank = bank
        largest = max((seg.numel for seg in bank.segments.values()), default=0)
        self.device = bank.device
        self._cuda = self.device.type == "cuda"
        slots = 2 if self._cuda else 1
        self._slots = [torch.empty(bank.n_parents, largest, dtype=bank.dtype, device=self.device) for _ in range(slots)]
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self.staging_bytes = sum(s.numel() * s.element_size() for s in self._slots)

    def _copy(self, seg: Segment, slot: int) -> list[Tensor]:
        staged = self._slots[slot]
        views = []
        for i, buffer in enumerate(self.bank.buffers):
            view = staged[i, : seg.numel]
            view.copy_(seg.view(buffer), non_blocking=self._cuda)
            views.append(view)
        return views

    def stream(self, segments: Sequence[Segment]) -> Iterator[tuple[Segment, list[Tensor]]]:
        """Each segment with its parents staged on the device; the caller merges before advancing."""
        segments = [s for s in segments if s.numel]
        if not self._cuda:
            for seg in segments:
                yield seg, self._copy(seg, 0)
            return
        assert self._stream is not None
        main = torch.cuda.current_stream(self.device)
        done_reading = [torch.cuda.Event(), torch.cuda.Event()]
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        for e in done_reading:
            e.record(main)

        def prefetch(index: int) -> list[Tensor]:
            slot = index % 2
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(done_reading[slot])  # the slot's previous segment is merged
                views = self._copy(segments[index], slot)
                ready[slot].record(self._stream)
            return views

        pending = prefetch(0) if segments else []
        for index, seg in enumerate(segments):
            views = pending
            if index + 1 < len(segments):
                pending = prefetch(index + 1)
            main.wait_event(ready[index % 2])
            yield seg, views
            done_reading[index % 2].record(main)
