"""Host-placed parents streamed to the GPU: merge time against a host-to-device copy of the same
bytes, and peak device memory against output + staging. CUDA only; one run, side by side.

Parents are random tensors in a Flux-shaped layout (the real block sizes of Flux.1-dev at
``--scale 1``; ``--scale 0.25`` shrinks every tensor's rows for smaller GPUs). Goals (issue 13):
streamed weighted_sum >= 80% of the copy bandwidth; peak device memory <= output + one block's
staging (two slots here: the copy of the next block overlaps the merge of this one).

    python bench/bench_streaming.py [--scale 1.0] [--dtype bf16] [--repeats 3]

Writes ``bench/results/streaming-<host>-<date>.json``.
"""

from __future__ import annotations

import argparse
import sys

try:
    from _common import machine_info, result_path, timing_stats, write_json
except ImportError:  # python -m bench.bench_streaming
    from ._common import machine_info, result_path, timing_stats, write_json


def _flux_like(scale: float, dtype, seed: int):
    """A canonical Flux.1-dev state dict of random values, each tensor's dim 0 scaled by ``scale``."""
    import torch

    from optimizer.architectures.layout import load_layout
    from optimizer.checkpoint.config_dir import diffusers_config_dir
    from optimizer.checkpoint.convert import build_empty_module, from_diffusers, module_configs

    layout = load_layout("flux")
    config = module_configs(diffusers_config_dir("flux"), layout)["transformer"]
    meta = from_diffusers(modules={"transformer": build_empty_module("diffusers.FluxTransformer2DModel", config, name="t").state_dict()},
                          layout=layout, configs={})
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, t in meta.items():
        shape = (max(1, int(t.shape[0] * scale)), *t.shape[1:])
        out[key] = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return layout, out


def main(argv: list[str] | None = None) -> int:
    import torch

    from optimizer.merge import Merger, MergeRecipe, ParentBank

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_streaming needs a CUDA device", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    layout, a = _flux_like(args.scale, dtype, 0)
    _, b = _flux_like(args.scale, dtype, 1)
    bank = ParentBank.build(state_dicts=[a, b], layout=layout, device="cuda", dtype=dtype, placement="host")
    del a, b
    element = bank.buffers[0].element_size()
    parent_bytes = bank.numel * element
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    merger = Merger(bank, backend="torch")
    recipe = MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.4)
    merge_s = []
    for _ in range(args.repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        merger.merge(recipe)
        end.record()
        torch.cuda.synchronize()
        merge_s.append(start.elapsed_time(end) / 1000)
    peak = torch.cuda.max_memory_allocated() - base
    staging = merger._stager.staging_bytes if merger._stager is not None else 0
    # the same bytes host -> device, one copy per parent into one device buffer
    target = torch.empty_like(merger.output)
    copy_s = []
    for _ in range(args.repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for buffer in bank.buffers:
            target.copy_(buffer, non_blocking=True)
        end.record()
        torch.cuda.synchronize()
        copy_s.append(start.elapsed_time(end) / 1000)
    merge, copy = timing_stats(merge_s[1:]), timing_stats(copy_s[1:])  # the first of each warms up
    result = {
        "machine": machine_info(device="cuda"),
        "scale": args.scale, "dtype": args.dtype, "parameters_per_parent": bank.numel, "bytes_per_parent": parent_bytes,
        "largest_segment_elements": max(s.numel for s in bank.segments.values()),
        "merge_s": merge, "h2d_copy_same_bytes_s": copy,
        "bandwidth_ratio_copy_over_merge": copy["median_s"] / merge["median_s"],  # goal >= 0.8
        "peak_device_bytes_above_baseline": peak, "output_bytes": parent_bytes, "staging_bytes": staging,
        "peak_over_output_plus_staging": peak / (parent_bytes + staging),
    }
    out = result_path("streaming")
    write_json(out, result)
    print(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
