"""Micro-benchmark of :meth:`Merger.merge` against a plain copy of the same bytes.

    python -m optimizer.merge.bench --numel 860e6 --dtype float16 [--device cuda] [--method weighted_sum]

Builds a synthetic SD1-shaped bank directly from flat random buffers (one span per block, so
only elementwise methods are meaningful) to avoid holding state dicts too: memory is
``(parents + 1) * numel * itemsize``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch

from optimizer.architectures import load_layout
from optimizer.merge.flat import ParentBank, Segment, Span
from optimizer.merge.kernel import Merger
from optimizer.merge.recipe import MergeRecipe


def synthetic_bank(*, numel: int, n_parents: int, dtype: torch.dtype, device: str, layout_name: str = "sd1") -> ParentBank:
    layout = load_layout(layout_name)
    names = list(layout.blocks)
    per = numel // len(names)
    segments, offset = {}, 0
    for i, name in enumerate(names):
        size = per if i < len(names) - 1 else numel - offset
        span = Span(key=f"{name}.weight", owner=name, offset=offset, numel=size, shape=(size,), index=i)
        segments[name] = Segment(name=name, start=offset, end=offset + size, component=False, spans=(span,))
        offset += size
    buffers = [torch.empty(numel, dtype=dtype, device=device).uniform_(-1, 1) for _ in range(n_parents)]
    return ParentBank(buffers=buffers, layout=layout, segments=segments, passthrough={}, keys=[s.spans[0].key for s in segments.values()])


def _time_interleaved(fns: dict[str, Callable[[], object]], *, repeat: int, device: torch.device) -> dict[str, list[float]]:
    """Run the candidates round-robin (after one warm-up each) so that background load hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=float, default=860e6)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="weighted_sum", choices=["weighted_sum", "add_difference"])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    n_parents = 2 if args.method == "weighted_sum" else 3
    bank = synthetic_bank(numel=int(args.numel), n_parents=n_parents, dtype=dtype, device=args.device)
    merger = Merger(bank)
    rng = random.Random(0)
    param = {"alpha": {b: rng.uniform(0, 1) for b in bank.layout.blocks}}
    recipe = MergeRecipe(method=args.method, params=param)
    gb = bank.numel * bank.buffers[0].element_size() / 1e9
    fns: dict[str, Callable[[], object]] = {
        "copy_(parent0)": lambda: merger.output.copy_(bank.buffers[0]),
        f"merger.merge {args.method} 26 blocks": lambda: merger.merge(recipe),
    }
    if args.method == "weighted_sum":
        fns["torch.lerp whole buffer (1 call)"] = lambda: torch.lerp(bank.buffers[0], bank.buffers[1], 0.3, out=merger.output)
    results = _time_interleaved(fns, repeat=args.repeat, device=bank.device)
    print(f"{bank!r}; {gb:.2f} GB per buffer; threads={torch.get_num_threads()}")
    for name, times in results.items():
        print(f"  {name:40s} best {min(times) * 1e3:8.1f} ms  median {statistics.median(times) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
