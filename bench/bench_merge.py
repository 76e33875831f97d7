#!/usr/bin/env python
"""Benchmark of evomerge's in-memory merge kernel on an SD1.5-shaped UNet (not a test).

One run measures, side by side and per dtype (fp16, fp32), on the 686 UNet tensors of SD1.5
(real LDM key names and shapes, 859,520,964 parameters) filled with seeded random values:

1. ``kernel``     evomerge ``Merger.merge`` (weighted_sum, 26 distinct MBW block weights),
                  median of ``--reps`` repetitions after one warm-up merge;
2. floors         ``out.copy_(A)`` (read 1, write 1), ``torch.add(A, B, out=out)`` (read 2,
                  write 1) and ``torch.lerp(A, B, 0.37, out=out)`` (the kernel's op, one call
                  over the whole flat buffer) on the same flat buffers;
3. ``naive``      a per-key Python loop ``{k: (1 - w) * A[k] + w * B[k]}`` (new tensors, as most
                  merge scripts do); its result is also the correctness reference;
4. ``sd-mecha``   ``sd_mecha.merge`` of the same parents (written to safetensors files in /tmp)
                  with the same 26 block weights via its ``sd1-supermerger_blocks`` config,
                  into an in-memory dict;
5. memory         peak RSS of bank build + merges in a fresh subprocess (CUDA: also
                  ``torch.cuda.max_memory_allocated``);
6. correctness    kernel output == naive output (allclose), and max error vs an fp64 reference.

Every measurement for one dtype runs in its own subprocess so fp32 (parents + output = 10.3 GB)
and the sd-mecha files are never in memory together. Results: a table on stdout and
``bench/results/merge-<hostname>-<date>.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__:  # python -m bench.bench_merge
    from . import _common as common
    from .merge_report import print_table, summarize
    from .sd15_unet import SD15_UNET_PARAMS, mecha_block, parent_state_dict, random_pool, sd15_unet_shapes
else:  # python bench/bench_merge.py
    import _common as common
    from merge_report import print_table, summarize
    from sd15_unet import SD15_UNET_PARAMS, mecha_block, parent_state_dict, random_pool, sd15_unet_shapes

# 26 distinct block weights (BASE, IN00..IN11, M00, OUT00..OUT11), strictly inside (0, 1) so that
# no implementation can shortcut a block to a plain copy of A or B.
WEIGHTS = [round(0.05 + 0.035 * i, 4) for i in range(26)]
MBW = ",".join(f"{w:g}" for w in WEIGHTS)
SEED_A, SEED_B = 1234, 5678
DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
TOLERANCES = {"fp16": (1e-3, 2e-4), "bf16": (1e-2, 2e-3), "fp32": (1e-5, 1e-7)}  # (rtol, atol)


# --------------------------------------------------------------------------------------------
# timing helpers


class Timer:
    """Wall clock on CPU; CUDA events on CUDA (``merger.merge`` itself also synchronizes)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def once(self, fn) -> float:
        return common.timed(fn, device=self.device, cuda_events=True)[1]

    def interleaved(self, fns: dict, reps: int, warmup: int = 1) -> dict:
        """Time each of ``fns`` ``reps`` times, round-robin (one call of each per round), so that
        background load on a shared machine hits all of them alike; paired per-round ratios to
        the first entry are recorded too."""
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                times[name].append(self.once(fn))
        first = next(iter(fns))
        out = {}
        for name, ts in times.items():
            out[name] = common.timing_stats(ts, warmup=warmup)
            if name != first:
                out[name][f"paired_{first}_over_this_median"] = statistics.median(k / t for k, t in zip(times[first], ts))
        return out


# --------------------------------------------------------------------------------------------
# workers (each runs in its own subprocess)


def _setup(args):
    import torch

    from optimizer.architectures import load_layout

    shapes = json.loads(Path(args.shapes).read_text())
    dtype = getattr(torch, DTYPES[args.dtype])
    layout = load_layout("sd1")
    return torch, shapes, dtype, layout


def worker_kernel(args) -> dict:
    """Kernel vs floors vs naive loop, plus correctness, for one dtype."""
    torch, shapes, dtype, layout = _setup(args)
    from optimizer.merge import Merger, MergeRecipe, ParentBank

    device = args.device
    timer = Timer(device)
    res: dict = {"dtype": args.dtype, "device": device, "loadavg_start": common.loadavg()}
    phases: dict[str, float] = {}
    res["phases_s"] = phases

    t0 = time.perf_counter()
    sd_a, sd_b = parent_state_dict(shapes, SEED_A), parent_state_dict(shapes, SEED_B)
    phases["parents"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = ParentBank.build(state_dicts=[sd_a, sd_b], layout=layout, device=device, dtype=dtype)
    common.cuda_sync(device)
    phases["bank_build"] = time.perf_counter() - t0
    del sd_a, sd_b
    gc.collect()
    t0 = time.perf_counter()
    merger = Merger(bank)
    common.cuda_sync(device)
    phases["merger_init"] = time.perf_counter() - t0
    recipe = MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw=MBW)
    a, b = bank.buffers
    out = merger.output
    numel = a.numel()
    res["numel"] = numel
    res["model_bytes"] = numel * a.element_size()
    res["bank"] = repr(bank)

    def kernel():
        merger.merge(recipe)

    def copy():
        out.copy_(a)

    def add():
        torch.add(a, b, out=out)

    def lerp_flat():
        torch.lerp(a, b, 0.37, out=out)

    # the kernel's op (one lerp per block segment, python-float weight) without the recipe
    # validation and bookkeeping of Merger.merge: isolates the kernel's own overhead
    segs = [bank.segments[blk] for blk in layout.blocks if bank.segments[blk].numel]
    seg_w = [float(recipe.params["alpha"][s.name]) for s in segs]

    def lerp_segments():
        for s, w in zip(segs, seg_w):
            torch.lerp(s.view(a), s.view(b), w, out=s.view(out))

    stats = merger.merge(recipe)  # first merge (a warm-up too; compiles the Triton kernel), from MergeStats
    res["backend"] = merger.backend
    res["first_merge_s"] = stats.seconds
    res["merge_calls"] = stats.calls
    res["merged_elements"] = stats.merged_elements
    fns = {"kernel": kernel, "copy": copy, "add": add, "lerp_flat": lerp_flat, "lerp_segments": lerp_segments}
    if merger.backend == "triton":
        # the torch path on the same bank (its own output buffer), and the fused kernel's tile sizes
        from optimizer.merge.fused import FusedLinear

        torch_merger = Merger(bank, backend="torch")
        fns["kernel_torch"] = lambda: torch_merger.merge(recipe)
        rows = [(1.0 - w, w) for w in (float(recipe.params["alpha"][blk]) for blk in layout.blocks)]
        for tile, warps in args.tiles:
            fused = FusedLinear(bank=bank, output=out, tile=tile, num_warps=warps)
            fns[f"fused_tile_{tile}x{warps}"] = lambda fused=fused: fused(rows)
    t0 = time.perf_counter()
    res.update(timer.interleaved(fns, args.reps))
    phases["timed_ops"] = time.perf_counter() - t0
    if args.methods:
        # the other methods (per-tensor torch ops), same two parents, 26 block weights
        t0 = time.perf_counter()
        per_method = {}
        for name, params in (("ties", {"alpha": 1.0, "density": 0.2}), ("dare", {"alpha": 1.0, "drop_rate": 0.9}), ("slerp", {})):
            r = MergeRecipe.from_mbw(method=name, layout=layout, mbw=MBW)
            r = MergeRecipe(method=name, params={**r.params, **{k: dict.fromkeys(layout.blocks, v) for k, v in params.items()}})
            per_method[name] = timer.interleaved({name: lambda r=r: merger.merge(r)}, args.method_reps)[name]
        res["methods"] = per_method
        phases["methods"] = time.perf_counter() - t0

    # naive per-key loop, on per-key views of the same parent buffers
    views_a = {sp.key: sp.view(a) for sp in bank.spans}
    views_b = {sp.key: sp.view(b) for sp in bank.spans}
    w_of = {sp.key: float(recipe.params["alpha"][sp.owner]) for sp in bank.spans}

    def naive_loop():
        return {k: (1 - w_of[k]) * views_a[k] + w_of[k] * views_b[k] for k in views_a}

    t0 = time.perf_counter()
    times = []
    naive = naive_loop()  # warm-up
    for _ in range(args.naive_reps):
        naive = None
        gc.collect()
        naive, seconds = common.timed(naive_loop, device=device)
        times.append(seconds)
    res["naive"] = common.timing_stats(times, warmup=1)
    phases["naive"] = time.perf_counter() - t0

    # correctness: the kernel's output after a fresh merge vs the naive result
    t0 = time.perf_counter()
    merger.merge(recipe)
    merged = merger.state_dict()
    rtol, atol = TOLERANCES[args.dtype]
    bad = []
    max_abs = 0.0
    max_err_kernel64 = max_err_naive64 = 0.0
    with torch.inference_mode():
        for i, k in enumerate(views_a):
            got, want = merged[k].float(), naive[k].float()  # fp32: the very tensors, no copy: no in-place ops
            diff = (got - want).abs_()
            max_abs = max(max_abs, diff.max().item())
            if not bool((diff <= atol + rtol * want.abs()).all()):  # torch.allclose(got, want, rtol, atol)
                bad.append(k)
            if i % 7 == 0:  # fp64 reference on ~100 tensors
                w = w_of[k]
                ref = (1 - w) * views_a[k].double() + w * views_b[k].double()
                max_err_kernel64 = max(max_err_kernel64, (merged[k].double() - ref).abs().max().item())
                max_err_naive64 = max(max_err_naive64, (naive[k].double() - ref).abs().max().item())
    res["correctness"] = {
        "kernel_allclose_naive": not bad and len(merged) == len(shapes),
        "tensors_checked": len(views_a),
        "mismatched_tensors": bad[:10],
        "rtol": rtol,
        "atol": atol,
        "max_abs_diff_kernel_vs_naive": max_abs,
        "max_abs_err_vs_fp64_kernel": max_err_kernel64,
        "max_abs_err_vs_fp64_naive": max_err_naive64,
        "keys_in_state_dict": len(merged),
    }
    phases["correctness"] = time.perf_counter() - t0
    del naive, merged
    gc.collect()
    if device.startswith("cuda"):
        res["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
    res["loadavg_end"] = common.loadavg()
    return res


def worker_memory(args) -> dict:
    """Peak memory of bank build + Merger + merges, in a fresh process."""
    torch, shapes, dtype, layout = _setup(args)
    from optimizer.merge import Merger, MergeRecipe, ParentBank

    device = args.device
    cuda = device.startswith("cuda")
    res: dict = {"dtype": args.dtype, "device": device}
    recipe = MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw=MBW)
    gc.collect()
    res["rss_baseline"] = common.proc_status_bytes("VmRSS")  # interpreter + torch + optimizer imported, no data yet
    sd_a, sd_b = parent_state_dict(shapes, SEED_A), parent_state_dict(shapes, SEED_B)
    res["rss_with_source_dicts"] = common.proc_status_bytes("VmRSS")  # + the two 128 MB random pools
    res["hwm_reset"] = common.reset_hwm()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bank = ParentBank.build(state_dicts=[sd_a, sd_b], layout=layout, device=device, dtype=dtype)
    del sd_a, sd_b
    gc.collect()
    res["rss_after_bank"] = common.proc_status_bytes("VmRSS")
    merger = Merger(bank)
    res["rss_after_merger"] = common.proc_status_bytes("VmRSS")
    res["peak_rss_build"] = common.proc_status_bytes("VmHWM")
    if cuda:
        res["cuda_peak_build"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    common.reset_hwm()
    rss0 = common.proc_status_bytes("VmRSS")
    for _ in range(3):
        merger.merge(recipe)
    res["rss_after_merges"] = common.proc_status_bytes("VmRSS")
    res["peak_rss_merge_phase"] = common.proc_status_bytes("VmHWM")
    res["merge_phase_growth"] = res["peak_rss_merge_phase"] - rss0
    if cuda:
        res["cuda_peak_merge_phase"] = torch.cuda.max_memory_allocated()
        res["cuda_max_memory_allocated"] = max(res["cuda_peak_build"], res["cuda_peak_merge_phase"])
    import resource

    res["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; reset with VmHWM
    model_bytes = bank.numel * bank.buffers[0].element_size()
    res["model_bytes"] = model_bytes
    res["peak_rss"] = max(res["peak_rss_build"], res["peak_rss_merge_phase"])
    res["peak_over_3x_model"] = res["peak_rss"] / (3 * model_bytes)
    res["peak_minus_baseline_over_3x_model"] = (res["peak_rss"] - res["rss_baseline"]) / (3 * model_bytes)
    if cuda:
        res["cuda_peak_over_3x_model"] = res["cuda_max_memory_allocated"] / (3 * model_bytes)
    return res


def write_safetensors(path: Path, tensors: dict, dtype) -> int:
    """Stream ``tensors`` (cast to ``dtype``) to a .safetensors file one tensor at a time."""
    import torch

    code = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[k] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            c = t.to(dtype).contiguous()
            f.write(c.view(torch.uint8).reshape(-1).numpy().tobytes() if dtype == torch.bfloat16 else c.numpy().tobytes())
    return 8 + len(raw) + offset


def worker_mecha(args) -> dict:
    """sd-mecha weighted_sum with per-block alpha (sd1-supermerger_blocks -> sd1-ldm)."""
    torch, shapes, dtype, layout = _setup(args)
    import logging

    import sd_mecha

    logging.getLogger().setLevel(logging.ERROR)
    device = args.device
    res: dict = {"dtype": args.dtype, "device": device, "version": common.package_version("sd-mecha")}
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-", dir=args.tmpdir))
    pa, pb = tmp / "parent_a.safetensors", tmp / "parent_b.safetensors"
    try:
        t0 = time.perf_counter()
        pool_a = random_pool(SEED_A)
        size = write_safetensors(pa, parent_state_dict(shapes, SEED_A, pool_a), dtype)
        del pool_a
        pool_b = random_pool(SEED_B)
        write_safetensors(pb, parent_state_dict(shapes, SEED_B, pool_b), dtype)
        del pool_b
        gc.collect()
        res["file_bytes_each"] = size
        res["write_files_s"] = time.perf_counter() - t0

        blocks = {b: float(w) for b, w in zip(layout.blocks, WEIGHTS, strict=True)}

        class _NoBar:  # sd-mecha wants a tqdm-like factory
            def __init__(self, *a, **k): pass
            def __enter__(self): return self
            def __exit__(self, *exc): return False
            def update(self, *a, **k): pass
            def set_postfix(self, *a, **k): pass
            def close(self): pass

        def build_recipe():
            model_a = sd_mecha.model(str(pa), "sd1-ldm")
            model_b = sd_mecha.model(str(pb), "sd1-ldm")
            alpha = sd_mecha.convert(sd_mecha.literal(blocks, "sd1-supermerger_blocks"), model_a)
            return sd_mecha.weighted_sum(model_a, model_b, alpha=alpha)

        res["api"] = (
            "sd_mecha.merge(sd_mecha.weighted_sum(sd_mecha.model(a, 'sd1-ldm'), sd_mecha.model(b, 'sd1-ldm'), "
            "alpha=sd_mecha.convert(sd_mecha.literal({block: w}, 'sd1-supermerger_blocks'), model_a)), "
            f"merge_device={device!r}, merge_dtype={dtype}, output_device={device!r}, output_dtype={dtype}, output=None -> in-memory dict)"
        )
        times = []
        loads = []
        out = None
        for _ in range(args.mecha_reps):
            loads.append(common.loadavg())
            out = None
            gc.collect()
            t0 = time.perf_counter()
            out = sd_mecha.merge(
                build_recipe(),
                merge_device=device,
                merge_dtype=dtype,
                output_device=device,
                output_dtype=dtype,
                tqdm=_NoBar,
            )
            common.cuda_sync(device)
            times.append(time.perf_counter() - t0)
        res["merge"] = common.timing_stats(times, warmup=0)
        res["merge"]["loadavg_before_each"] = loads
        res["output"] = "in-memory dict (output=None)"
        res["threads"] = "default: min(max(open files, 2), cpu_count, 4)"

        # check what sd-mecha produced against the naive formula (sd-mecha's block convention)
        t0 = time.perf_counter()
        sd_a, sd_b = parent_state_dict(shapes, SEED_A), parent_state_dict(shapes, SEED_B)
        rtol, atol = TOLERANCES[args.dtype]
        bad, missing, max_abs = [], [], 0.0
        with torch.inference_mode():
            for k in shapes:
                if k not in out:
                    missing.append(k)
                    continue
                w = blocks[mecha_block(k)]
                want = ((1 - w) * sd_a[k].to(dtype) + w * sd_b[k].to(dtype)).float()
                got = out[k].to("cpu").float()
                diff = (got - want).abs_()
                max_abs = max(max_abs, diff.max().item())
                if tuple(got.shape) != tuple(shapes[k]) or not bool((diff <= atol + rtol * want.abs()).all()):
                    bad.append(k)
        extra = {k: (list(v.shape) if hasattr(v, "shape") else repr(v)[:200]) for k, v in out.items() if k not in shapes and k != "__metadata__"}
        res["correctness"] = {
            "keys_out": len(out),
            "output_has_metadata_entry": "__metadata__" in out,  # sd-mecha stores its recipe there
            "allclose_naive_with_mecha_blocks": not bad and not missing,
            "missing": missing[:10],
            "mismatched": bad[:10],
            "extra_keys_in_output": extra,
            "max_abs_diff": max_abs,
            "rtol": rtol,
            "atol": atol,
            "note": "sd-mecha assigns time_embed to BASE (evomerge: IN00); the reference uses sd-mecha's convention",
        }
        res["check_s"] = time.perf_counter() - t0
        del out
    finally:
        for p in (pa, pb):
            p.unlink(missing_ok=True)
        tmp.rmdir()
    return res


WORKERS = {"kernel": worker_kernel, "memory": worker_memory, "mecha": worker_mecha}


# --------------------------------------------------------------------------------------------
# driver


def run_worker(kind: str, dtype: str, args, shapes_path: Path) -> dict:
    cmd = [
        "--_worker", kind,
        "--_dtype", dtype, "--_shapes", str(shapes_path), "--device", args.device,
        "--reps", str(args.reps), "--naive-reps", str(args.naive_reps), "--mecha-reps", str(args.mecha_reps),
        "--tmpdir", args.tmpdir, "--tiles", ",".join(f"{t}:{w}" for t, w in args.tiles), "--method-reps", str(args.method_reps),
    ] + (["--methods"] if args.methods else [])
    print(f"[bench] {kind:6s} {dtype} ...", end="", flush=True)
    res, returncode = common.run_worker(__file__, cmd)
    print(f" FAILED (exit {returncode})" if returncode != 0 else f" {res['wall_s']:.1f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="fp16,fp32", help="comma-separated, of fp16, fp32, bf16 (default: fp16,fp32)")
    p.add_argument("--skip-mecha", action="store_true", help="do not run sd-mecha (no files written)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds of kernel and floors, after 1 warm-up (default 7)")
    p.add_argument("--naive-reps", type=int, default=5, help="timed repetitions of the naive loop (default 5)")
    p.add_argument("--mecha-reps", type=int, default=2, help="timed sd-mecha merges (default 2)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda")
    p.add_argument("--methods", action="store_true", help="also time ties, dare and slerp merges")
    p.add_argument("--method-reps", type=int, default=3, help="timed merges per method with --methods (default 3)")
    p.add_argument(
        "--tiles",
        default="1024:4,2048:4,2048:8,4096:4,4096:8,8192:8",
        help="fused kernel TILE:NUM_WARPS pairs to time on CUDA (default 1024:4,2048:4,2048:8,4096:4,4096:8,8192:8)",
    )
    p.add_argument("--tmpdir", default="/tmp", help="where sd-mecha's parent files are written (and deleted)")
    p.add_argument("--output", default=None, help="JSON path (default bench/results/merge-<host>-<date>.json)")
    p.add_argument("--_worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_dtype", help=argparse.SUPPRESS)
    p.add_argument("--_shapes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tiles = [tuple(int(x) for x in t.split(":")) for t in str(args.tiles).split(",") if t.strip()]

    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args._worker:
        args.dtype, args.shapes = args._dtype, args._shapes
        res = WORKERS[args._worker](args)
        Path(args._out).write_text(json.dumps(res, default=str))
        return 0

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; use {', '.join(DTYPES)}")
    if not args.skip_mecha and importlib.util.find_spec("sd_mecha") is None:
        p.error("sd-mecha is not installed: pip install sd-mecha (see bench/README.md), or pass --skip-mecha")

    started = time.perf_counter()
    info = common.machine_info(device=args.device, packages=("diffusers", "safetensors", "sd-mecha", "evomerge"))
    t0 = time.perf_counter()
    shapes, source = sd15_unet_shapes()
    print(f"[bench] SD1.5 UNet: {len(shapes)} tensors, {sum(math.prod(s) for s in shapes.values()):,} params ({time.perf_counter() - t0:.1f} s)")
    print(f"[bench] keys/shapes from: {source}")
    print(f"[bench] block weights (MBW): {MBW}")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(shapes, f)
        shapes_path = Path(f.name)
    raw: dict = {}
    try:
        for d in dtypes:
            raw[d] = {"kernel": run_worker("kernel", d, args, shapes_path), "memory": run_worker("memory", d, args, shapes_path)}
            if not args.skip_mecha:
                raw[d]["mecha"] = run_worker("mecha", d, args, shapes_path)
    finally:
        shapes_path.unlink(missing_ok=True)

    summary = {d: summarize(d, raw[d], args.device) for d in dtypes}
    print_table(summary, info)
    mecha_api = next((raw[d]["mecha"].get("api") for d in dtypes if "mecha" in raw[d]), None)
    result = {
        "benchmark": "evomerge merge kernel, SD1.5 UNet (686 tensors, 859,520,964 params), weighted_sum, 26 block weights",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "model": {"tensors": len(shapes), "params": SD15_UNET_PARAMS, "keys_source": source, "parents": "seeded N(0, 0.02^2), windows of a 32M-value pool per parent"},
        "mbw": MBW,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "sd_mecha_api": mecha_api,
        "summary": summary,
        "raw": raw,
        "total_wall_s": time.perf_counter() - started,
    }
    out = common.write_json(Path(args.output) if args.output else common.result_path("merge"), result, default=str)
    print(f"[bench] wrote {out} (total {result['total_wall_s']:.0f} s)")
    ok = all(summary[d]["correct"] for d in dtypes) and all(summary[d]["mecha_correct"] in (None, True) for d in dtypes)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
