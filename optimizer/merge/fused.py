"""The fused GPU merge kernel (Triton) for linear methods: one launch per merge, every block at once.

A linear method (``MergeMethod.coefficients`` is set: ``weighted_sum``, ``add_difference``) gives,
for each block ``b``, coefficients ``c[b, i]`` with ``out = sum_i c[b, i] P_i``. The bank's buffers
keep each block contiguous and aligned (:data:`~optimizer.merge.flat.SEGMENT_ALIGN`), so the whole
merge is one pass over the flat buffers::

    out[x] = round( sum_i c[seg(x), i] * float32(P_i[x]) )

computed by ONE Triton launch: each program handles one *tile* of at most ``tile`` elements that
lies inside a single segment, reads its segment's coefficient row once, reads each parent's tile
once and writes the output tile once. Tiles never cross a segment boundary, so no per-element
segment lookup is needed; a segment's last tile is masked at the segment's aligned end (it also
merges the segment's zero padding, which stays zero). Tile starts and ends are multiples of the
alignment, which Triton is told (``tl.multiple_of``) so that loads and stores are 16-byte vectors. Arithmetic is fp32 whatever the storage dtype,
rounded once on the store (more exact than the multi-pass torch path for 3+ parents; identities
stay exact: coefficients ``(1, 0)`` give ``A`` and ``(0, 1)`` give ``B`` bit for bit).

The tile table (start, end, segment of every tile) is built once per :class:`FusedLinear`, on the
device; blocks come first in the buffers, then components (VAE), so the block-only grid is a prefix
of the full grid and a merge without ``merge_vae`` simply launches fewer programs.

Triton needs a CUDA device. For tests on CPU, Triton's interpreter runs the same kernel when the
environment variable ``TRITON_INTERPRET=1`` is set before the kernel is first compiled
(:func:`fused_available` says whether the kernel can run on a device).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from optimizer.merge.errors import MergeError
from optimizer.merge.flat import SEGMENT_ALIGN, ParentBank

#: the kernel takes at most this many parent pointers (``weighted_sum`` takes up to 5 parents)
MAX_PARENTS = 5
#: elements per program; measured on an H100 (bench/bench_merge.py --tiles), see bench/README.md
DEFAULT_TILE = 8192


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def fused_available(device: torch.device | str) -> bool:
    """True when the Triton kernel can run on ``device``: CUDA with Triton, or any device under
    Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    device = torch.device(device)
    if not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreting()


@functools.cache
def _kernel():
    """The Triton kernel, compiled lazily (so importing this module never needs Triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def linear_combination(
        out_ptr,
        p0,
        p1,
        p2,
        p3,
        p4,
        coef_ptr,
        tile_start_ptr,
        tile_end_ptr,
        tile_segment_ptr,
        N_PARENTS: tl.constexpr,
        TILE: tl.constexpr,
        ALIGN: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # every tile starts at a multiple of ALIGN elements (segments are aligned, tiles are a
        # multiple of ALIGN long): the hint lets Triton emit 16-byte vector loads and stores
        start = tl.multiple_of(tl.load(tile_start_ptr + pid), ALIGN)
        # tiles end at a multiple of ALIGN too (a segment's last tile runs over its zero padding,
        # up to the next aligned offset), so the mask is constant over each vector: with an
        # arbitrary end, Triton's analysis would split every masked load into scalar loads
        end = tl.multiple_of(tl.load(tile_end_ptr + pid), ALIGN)
        row = tl.load(tile_segment_ptr + pid) * N_PARENTS
        offsets = start + tl.arange(0, TILE)
        mask = offsets < end
        acc = tl.load(p0 + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(coef_ptr + row)
        if N_PARENTS > 1:
            acc += tl.load(p1 + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(coef_ptr + row + 1)
        if N_PARENTS > 2:
            acc += tl.load(p2 + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(coef_ptr + row + 2)
        if N_PARENTS > 3:
            acc += tl.load(p3 + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(coef_ptr + row + 3)
        if N_PARENTS > 4:
            acc += tl.load(p4 + offsets, mask=mask, other=0.0).to(tl.float32) * tl.load(coef_ptr + row + 4)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return linear_combination


class FusedLinear:
    """Launches the fused linear-combination kernel over a bank's segments into ``output``.

    ``segments`` are the bank's segment names in buffer order (blocks, then components);
    :meth:`__call__` takes one coefficient row per segment of a prefix of them.
    """

    def __init__(self, *, bank: ParentBank, output: Tensor, tile: int = DEFAULT_TILE, num_warps: int = 8) -> None:
        if bank.n_parents > MAX_PARENTS:
            raise MergeError(f"the fused kernel takes at most {MAX_PARENTS} parents, the bank has {bank.n_parents}")
        if tile < SEGMENT_ALIGN or tile & (tile - 1):
            raise MergeError(f"tile must be a power of two >= {SEGMENT_ALIGN}, got {tile}")
        if not fused_available(bank.device):
            raise MergeError(
                f"the fused Triton kernel cannot run on {bank.device}: it needs CUDA and Triton "
                "(or TRITON_INTERPRET=1 for Triton's CPU interpreter, for tests)"
            )
        self.bank = bank
        self.output = output
        self.tile = tile
        self.num_warps = num_warps
        self.segment_names = tuple(bank.segments)
        starts: list[int] = []
        ends: list[int] = []
        owners: list[int] = []
        self.grid_after: dict[str, int] = {}  # segment name -> number of tiles up to and including it
        for index, name in enumerate(self.segment_names):
            seg = bank.segments[name]
            if seg.start % SEGMENT_ALIGN:
                raise MergeError(f"segment {name} starts at {seg.start}, not a multiple of {SEGMENT_ALIGN}")
            padded_end = -(-seg.end // SEGMENT_ALIGN) * SEGMENT_ALIGN  # <= the next segment's start
            for tile_start in range(seg.start, padded_end, tile):
                starts.append(tile_start)
                ends.append(min(tile_start + tile, padded_end))
                owners.append(index)
            self.grid_after[name] = len(starts)
        device = bank.device
        self._tile_start = torch.tensor(starts, dtype=torch.int64, device=device)
        self._tile_end = torch.tensor(ends, dtype=torch.int64, device=device)
        self._tile_segment = torch.tensor(owners, dtype=torch.int32, device=device)
        self._coefficients = torch.zeros(len(self.segment_names), bank.n_parents, dtype=torch.float32, device=device)

    @property
    def n_tiles(self) -> int:
        return int(self._tile_start.numel())

    def __call__(self, coefficients: Sequence[Sequence[float]]) -> int:
        """Merge the first ``len(coefficients)`` segments: ``out = sum_i coefficients[s][i] * P_i``
        on segment ``s``. Returns the number of programs launched (0 if nothing to do)."""
        rows = len(coefficients)
        if not 0 < rows <= len(self.segment_names):
            raise MergeError(f"need 1 to {len(self.segment_names)} coefficient rows, got {rows}")
        n = self.bank.n_parents
        if any(len(row) != n for row in coefficients):
            raise MergeError(f"every coefficient row needs {n} values (one per parent)")
        # one small host-to-device copy per merge
        self._coefficients[:rows].copy_(torch.tensor(coefficients, dtype=torch.float32))
        grid = self.grid_after[self.segment_names[rows - 1]]
        if grid == 0:
            return 0
        buffers = list(self.bank.buffers) + [self.bank.buffers[0]] * (MAX_PARENTS - n)
        _kernel()[(grid,)](
            self.output,
            *buffers,
            self._coefficients,
            self._tile_start,
            self._tile_end,
            self._tile_segment,
            N_PARENTS=n,
            TILE=self.tile,
            ALIGN=SEGMENT_ALIGN,
            num_warps=self.num_warps,
        )
        return grid
