#!/usr/bin/env python
"""Benchmark: full SD1.5 VAE decoder vs TAESD decoder, decode time and peak memory (not a test).

For SD latents of 64x64 (512x512 images) at each batch size, on CPU and (when available) CUDA:

1. time    ``AutoencoderKL.decode(latents / 0.18215)`` (the SD1.5 VAE built from the shipped config
           ``optimizer/checkpoint/configs/sd15/vae/config.json``, random init: the time does not
           depend on the weights) and ``AutoencoderTiny.decode(latents)`` (TAESD, real weights from
           ``../shared/assets/taesd``, decoder-only; random init with a note if absent), in one
           subprocess per device, interleaved round-robin so that background load on a shared
           machine hits both alike; medians of ``--reps`` after ``--warmup`` calls per batch size;
2. memory  one decode per (decoder, batch size) in a fresh subprocess each. CPU: the peak RSS
           increase during the decode (``VmHWM`` after the decode, reset via
           ``/proc/self/clear_refs`` just before it, minus ``VmRSS`` before it) and the process's
           lifetime peak (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, imports + model + decode);
           CUDA: ``torch.cuda.max_memory_allocated`` during the decode minus the allocation before
           it, and the absolute peak;
3. params  parameters on the decode path (full: ``decoder`` + ``post_quant_conv``; TAESD: ``decoder``).

Results: a table on stdout and ``bench/results/taesd-<hostname>-<date>.json`` with full/TAESD
ratios. Example (2-core CPU, about 2.5 min): ``python bench/bench_taesd.py --device cpu
--batch-sizes 1,2 --reps 3 --warmup 0``; GPU: ``python bench/bench_taesd.py`` (CPU and CUDA,
batch sizes 1 and 4).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__:  # python -m bench.bench_taesd
    from . import _common as common
else:  # python bench/bench_taesd.py
    import _common as common

SD15_VAE_CONFIG = common.REPO / "optimizer" / "checkpoint" / "configs" / "sd15" / "vae" / "config.json"
DEFAULT_TAESD_DIR = common.REPO.parent / "shared" / "assets" / "taesd"
LATENT = 64  # 64x64 latents -> 512x512 images
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
VARIANTS = ("full", "taesd")
SEED = 1234


# --------------------------------------------------------------------------------------------
# helpers


def build_decoder(variant: str, *, device: str, dtype_name: str, taesd_dir: Path):
    """``(decode_fn(latents) -> images, params on the decode path, weights note)``."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    torch.manual_seed(SEED)
    if variant == "full":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(json.loads(SD15_VAE_CONFIG.read_text()))
        torch.nn.Module.to(vae, device=device, dtype=dtype).eval()
        vae.encoder = None  # decode path only (as the decoder-only TAESD); frees its memory
        vae.quant_conv = None
        scale = vae.config.scaling_factor
        params = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
        return (lambda z: vae.decode(z / scale).sample), params, "random init (timing/memory do not depend on weights)"
    if variant == "taesd":
        from optimizer.render.taesd import TAESD_CONFIGS, load_taesd, taesd_files

        decoder_file = taesd_files(taesd_dir, "sd")[1]
        if decoder_file.is_file():
            tiny = load_taesd(decoder=decoder_file, dtype=dtype, device=device)
            note = f"real weights {decoder_file.name} (decoder-only)"
        else:
            from diffusers import AutoencoderTiny

            tiny = AutoencoderTiny(**TAESD_CONFIGS["sd"])
            torch.nn.Module.to(tiny, device=device, dtype=dtype).eval()
            tiny.encoder = None
            note = f"random init: {decoder_file} absent"
        params = sum(p.numel() for p in tiny.decoder.parameters())
        return (lambda z: tiny.decode(z).sample), params, note
    raise ValueError(variant)


def _latents(batch: int, *, device: str, dtype_name: str):
    import torch

    generator = torch.Generator().manual_seed(SEED + batch)
    z = torch.randn(batch, 4, LATENT, LATENT, generator=generator)  # unit-variance, like scaled SD latents
    return z.to(device=device, dtype=getattr(torch, DTYPES[dtype_name]))


# --------------------------------------------------------------------------------------------
# workers (each in its own subprocess)


def worker_time(args) -> dict:
    import torch

    device, batches = args.device, [int(b) for b in args.batch_sizes.split(",")]
    decoders = {v: build_decoder(v, device=device, dtype_name=args.dtype, taesd_dir=Path(args.taesd_dir)) for v in VARIANTS}
    res: dict = {
        "device": device,
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "params": {v: d[1] for v, d in decoders.items()},
        "weights": {v: d[2] for v, d in decoders.items()},
        "batches": {},
    }

    def once(fn, z) -> float:
        out, seconds = common.timed(lambda: fn(z), device=device, cuda_events=True)
        assert out.shape == (z.shape[0], 3, 8 * LATENT, 8 * LATENT) and bool(torch.isfinite(out).all()), out.shape
        return seconds

    with torch.inference_mode():
        for batch in batches:
            z = _latents(batch, device=device, dtype_name=args.dtype)
            load_before = common.loadavg()
            for _ in range(args.warmup):
                for fn, _params, _note in decoders.values():
                    once(fn, z)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.reps):  # round-robin: one call of each per round
                for v, (fn, _params, _note) in decoders.items():
                    times[v].append(once(fn, z))
            entry = {v: common.timing_stats(ts) for v, ts in times.items()}
            for v in VARIANTS:
                entry[v]["per_image_ms"] = 1000 * entry[v]["median_s"] / batch
            entry["ratio_full_over_taesd"] = entry["full"]["median_s"] / entry["taesd"]["median_s"]
            entry["paired_ratio_median"] = statistics.median(f / t for f, t in zip(times["full"], times["taesd"]))
            entry["reps"], entry["warmup"] = args.reps, args.warmup
            entry["loadavg_before"], entry["loadavg_after"] = load_before, common.loadavg()
            res["batches"][str(batch)] = entry
            print(f"[bench]   {device} batch {batch}: full {entry['full']['median_s']:.3f} s, taesd {entry['taesd']['median_s']:.3f} s", flush=True)
    return res


def worker_memory(args) -> dict:
    import torch

    device, batch = args.device, int(args.batch_sizes)
    rss_after_import = common.proc_status_bytes("VmRSS")
    fn, params, note = build_decoder(args.variant, device=device, dtype_name=args.dtype, taesd_dir=Path(args.taesd_dir))
    z = _latents(batch, device=device, dtype_name=args.dtype)
    res: dict = {"variant": args.variant, "device": device, "dtype": args.dtype, "batch": batch, "params": params, "weights": note}
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn(z)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            res.update({
                "method": "torch.cuda.max_memory_allocated during one decode, minus memory_allocated before it (weights + latents)",
                "allocated_before_bytes": before,
                "peak_allocated_bytes": peak,
                "decode_peak_extra_bytes": peak - before,
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
            })
        else:
            rss_before = common.proc_status_bytes("VmRSS")
            reset = common.reset_hwm()
            out = fn(z)
            hwm = common.proc_status_bytes("VmHWM")
            res.update({
                "method": "VmHWM after one decode (reset by /proc/self/clear_refs just before) minus VmRSS before it; "
                "process_peak_rss_bytes is getrusage(RUSAGE_SELF).ru_maxrss (imports + model + decode)",
                "hwm_reset": reset,
                "rss_after_import_bytes": rss_after_import,
                "rss_before_decode_bytes": rss_before,
                "hwm_after_decode_bytes": hwm,
                "decode_peak_extra_bytes": hwm - rss_before,
            })
    assert out.shape == (batch, 3, 8 * LATENT, 8 * LATENT)
    res["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return res


# --------------------------------------------------------------------------------------------
# driver


def run_worker(kind: str, args, *, device: str, variant: str | None = None, batch: int | None = None) -> dict:
    cmd = [
        "--_worker", kind, "--device", device,
        "--dtype", args.dtypes[device], "--batch-sizes", str(batch) if batch is not None else args.batch_sizes,
        "--reps", str(args.reps), "--warmup", str(args.warmup), "--taesd-dir", str(args.taesd_dir),
    ] + (["--_variant", variant] if variant else [])
    label = f"{kind} {device}" + (f" {variant} batch {batch}" if variant else "")
    print(f"[bench] {label} ...", flush=True)
    res, returncode = common.run_worker(__file__, cmd)
    if returncode != 0:
        print(f"[bench] {label} FAILED (exit {returncode})")
    return res


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def print_table(results: dict, params: dict) -> None:
    print()
    print(f"decode-path parameters: full SD1.5 VAE decoder {params['full']:,}, TAESD decoder {params['taesd']:,} "
          f"({params['full'] / params['taesd']:.1f}x)")
    head = f"{'device':6s} {'dtype':5s} {'batch':>5s} | {'full s':>8s} {'taesd s':>8s} {'time x':>7s} | " \
           f"{'full MiB':>9s} {'taesd MiB':>9s} {'mem x':>6s} | {'full RSS':>9s} {'taesd RSS':>9s}"
    print(head)
    print("-" * len(head))
    for device, r in results.items():
        for batch, b in r["batches"].items():
            mem = b.get("memory", {})
            full_mem, taesd_mem = (mem.get(v, {}).get("decode_peak_extra_bytes") for v in VARIANTS)
            full_rss, taesd_rss = (mem.get(v, {}).get("process_peak_rss_bytes") if device == "cpu" else None for v in VARIANTS)
            ratio = b.get("ratio_peak_full_over_taesd")
            print(f"{device:6s} {r['dtype']:5s} {batch:>5s} | {b['full']['median_s']:8.3f} {b['taesd']['median_s']:8.3f} "
                  f"{b['ratio_full_over_taesd']:7.1f} | {_mb(full_mem):>9s} {_mb(taesd_mem):>9s} "
                  f"{'-' if ratio is None else f'{ratio:6.1f}':>6s} | {_mb(full_rss):>9s} {_mb(taesd_rss):>9s}")
    print("(time: median decode seconds per batch; MiB: peak memory added by one decode; RSS: worker process peak, CPU)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CPU, plus CUDA if available")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each decoder per batch size")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp32 on CPU, fp16 on CUDA")
    parser.add_argument("--taesd-dir", type=Path, default=DEFAULT_TAESD_DIR)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--_worker", choices=("time", "memory"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args._worker:
        args.variant = args._variant
        res = worker_time(args) if args._worker == "time" else worker_memory(args)
        args._out.write_text(json.dumps(res))
        return 0

    import torch

    devices = ["cpu"] if args.device == "cpu" else ["cuda"] if args.device == "cuda" else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.dtypes = {d: args.dtype or ("fp16" if d == "cuda" else "fp32") for d in devices}
    started = time.perf_counter()
    info = common.machine_info()
    results: dict = {}
    params: dict = {}
    for device in devices:
        timing = run_worker("time", args, device=device)
        if "error" in timing:
            results[device] = timing
            continue
        params = timing["params"]
        for batch, entry in timing["batches"].items():
            if args.skip_memory:
                continue
            entry["memory"] = {v: run_worker("memory", args, device=device, variant=v, batch=int(batch)) for v in VARIANTS}
            full, tiny = (entry["memory"][v].get("decode_peak_extra_bytes") for v in VARIANTS)
            entry["ratio_peak_full_over_taesd"] = full / tiny if full and tiny else None
            if device == "cpu":
                full, tiny = (entry["memory"][v].get("process_peak_rss_bytes") for v in VARIANTS)
                entry["ratio_process_peak_rss_full_over_taesd"] = full / tiny if full and tiny else None
        results[device] = timing

    ok = {d: r for d, r in results.items() if "error" not in r}
    if ok:
        print_table(ok, params)
    report = {
        "benchmark": "SD latent decode, 64x64 latents -> 512x512 images: full SD1.5 VAE decoder (AutoencoderKL) vs TAESD (AutoencoderTiny)",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_") and k != "variant"},
        "full_vae": f"diffusers AutoencoderKL.from_config({SD15_VAE_CONFIG.relative_to(common.REPO)}), random init; decode(latents / 0.18215)",
        "taesd": "optimizer.render.taesd.load_taesd(decoder=taesd_decoder.safetensors): AutoencoderTiny decoder-only; decode(latents)",
        "params_decode_path": {**params, "ratio_full_over_taesd": params["full"] / params["taesd"] if params else None},
        "memory_method": {
            "cpu": "per decoder and batch size, a fresh subprocess doing one decode: decode_peak_extra_bytes = VmHWM after the decode "
            "(reset via /proc/self/clear_refs before it) - VmRSS before it; process_peak_rss_bytes = getrusage ru_maxrss",
            "cuda": "per decoder and batch size, a fresh subprocess doing one decode: decode_peak_extra_bytes = "
            "torch.cuda.max_memory_allocated - memory_allocated before the decode",
        },
        "results": results,
        "total_wall_s": time.perf_counter() - started,
    }
    out = common.write_json(args.output or common.result_path("taesd"), report, indent=1)
    print(f"\nwrote {out} ({report['total_wall_s']:.0f} s)")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
