"""The merge benchmark's summary: headline ratios and goals from the workers' raw timings, and the table.

:func:`summarize` turns one dtype's worker results into medians, paired per-round ratios (kernel
over each floor), bandwidths, memory and correctness; :func:`print_table` prints them side by side
per dtype. Part of ``bench/``, not of the package.
"""

from __future__ import annotations


def _ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x is not None and y else None


def _med(d: dict, *path: str) -> float | None:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d.get("median_s") if isinstance(d, dict) else None


def summarize(dtype: str, r: dict, device: str) -> dict:
    k = r.get("kernel", {})
    kernel = _med(k, "kernel")
    model_bytes = k.get("model_bytes")
    s = {
        "kernel_s": kernel,
        "copy_s": _med(k, "copy"),
        "add_s": _med(k, "add"),
        "lerp_flat_s": _med(k, "lerp_flat"),
        "lerp_segments_s": _med(k, "lerp_segments"),
        "naive_s": _med(k, "naive"),
        "mecha_s": _med(r.get("mecha", {}), "merge"),
        "model_bytes": model_bytes,
        "backend": k.get("backend"),
        "kernel_torch_s": _med(k, "kernel_torch"),
    }
    for name in ("ties", "dare", "slerp"):
        s[f"{name}_s"] = _med(k.get("methods", {}), name)
    s["tiles_s"] = {key.removeprefix("fused_tile_"): v["median_s"] for key, v in k.items() if key.startswith("fused_tile_")}
    # headline ratios: median over rounds of (kernel time / op time) in the same round, robust to
    # background load on a shared machine; *_medians: ratio of the two medians; *_mins: of the minima
    for op in ("copy", "add", "lerp_flat", "lerp_segments", "kernel_torch"):
        s[f"kernel_over_{op}"] = k.get(op, {}).get("paired_kernel_over_this_median")
        s[f"kernel_over_{op}_medians"] = _ratio(kernel, s[f"{op}_s"])
        s[f"kernel_over_{op}_mins"] = _ratio(k.get("kernel", {}).get("min_s"), k.get(op, {}).get("min_s"))
    s["naive_over_kernel"] = _ratio(s["naive_s"], kernel)
    s["mecha_over_kernel"] = _ratio(s["mecha_s"], kernel)
    if model_bytes and kernel:
        # bytes moved by a 2-parent lerp: read A, read B, write out
        s["kernel_GBps"] = 3 * model_bytes / kernel / 1e9
        s["copy_GBps"] = 2 * model_bytes / s["copy_s"] / 1e9 if s["copy_s"] else None
        s["add_GBps"] = 3 * model_bytes / s["add_s"] / 1e9 if s["add_s"] else None
    goal = 1.5 if device.startswith("cuda") else 1.3
    s["goals"] = {
        "kernel_over_copy_max": goal,
        "kernel_over_copy_met": s["kernel_over_copy"] is not None and s["kernel_over_copy"] <= goal,
        "mecha_over_kernel_min": 20,
        "mecha_over_kernel_met": None if s["mecha_over_kernel"] is None else s["mecha_over_kernel"] >= 20,
    }
    m = r.get("memory", {})
    s["peak_rss_bytes"] = m.get("peak_rss")
    s["peak_over_3x_model"] = m.get("peak_over_3x_model")
    s["peak_minus_baseline_over_3x_model"] = m.get("peak_minus_baseline_over_3x_model")
    s["merge_phase_rss_growth_bytes"] = m.get("merge_phase_growth")
    s["cuda_max_memory_allocated"] = m.get("cuda_max_memory_allocated")
    s["correct"] = k.get("correctness", {}).get("kernel_allclose_naive")
    s["mecha_correct"] = r.get("mecha", {}).get("correctness", {}).get("allclose_naive_with_mecha_blocks")
    return s


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def print_table(summary: dict, info: dict) -> None:
    dts = list(summary)
    rows = [
        ("evomerge kernel (s)", "kernel_s", "{:.4f}"),
        ("  kernel backend", "backend", "str"),
        ("  torch backend on CUDA (s)", "kernel_torch_s", "{:.4f}"),
        ("copy_ floor (s)", "copy_s", "{:.4f}"),
        ("add(a,b,out) floor (s)", "add_s", "{:.4f}"),
        ("lerp flat, 1 call (s)", "lerp_flat_s", "{:.4f}"),
        ("lerp per segment (s)", "lerp_segments_s", "{:.4f}"),
        ("naive per-key loop (s)", "naive_s", "{:.3f}"),
        ("sd-mecha merge (s)", "mecha_s", "{:.2f}"),
        ("kernel / copy (paired per round)", "kernel_over_copy", "{:.2f}"),
        ("kernel / copy (ratio of medians)", "kernel_over_copy_medians", "{:.2f}"),
        ("kernel / copy (ratio of minima)", "kernel_over_copy_mins", "{:.2f}"),
        ("kernel / add", "kernel_over_add", "{:.2f}"),
        ("kernel / lerp flat", "kernel_over_lerp_flat", "{:.2f}"),
        ("kernel / lerp per segment", "kernel_over_lerp_segments", "{:.2f}"),
        ("kernel / torch backend", "kernel_over_kernel_torch", "{:.2f}"),
        ("ties merge (s)", "ties_s", "{:.3f}"),
        ("dare merge (s)", "dare_s", "{:.3f}"),
        ("slerp merge (s)", "slerp_s", "{:.3f}"),
        ("naive / kernel", "naive_over_kernel", "{:.1f}"),
        ("sd-mecha / kernel", "mecha_over_kernel", "{:.1f}"),
        ("kernel GB/s (3 x model)", "kernel_GBps", "{:.1f}"),
        ("copy GB/s (2 x model)", "copy_GBps", "{:.1f}"),
        ("model size (GB)", "model_bytes", None),
        ("peak RSS (GB)", "peak_rss_bytes", None),
        ("peak RSS / (3 x model)", "peak_over_3x_model", "{:.3f}"),
        ("(peak-baseline)/(3 x model)", "peak_minus_baseline_over_3x_model", "{:.3f}"),
        ("CUDA max allocated (GB)", "cuda_max_memory_allocated", None),
        ("kernel == naive (allclose)", "correct", "bool"),
        ("sd-mecha == naive", "mecha_correct", "bool"),
    ]
    head = f"{'SD1.5 UNet, ' + info['device'] + ', ' + str(info['torch_threads']) + ' threads':34s}" + "".join(f"{d:>12s}" for d in dts)
    print()
    print(head)
    print("-" * len(head))
    for label, key, fmt in rows:
        cells = []
        for d in dts:
            v = summary[d].get(key)
            if fmt is None:
                cells.append(_f(v / 1e9 if v is not None else None, "{:.2f}"))
            elif fmt == "str":
                cells.append("-" if v is None else str(v))
            elif fmt == "bool":
                cells.append("-" if v is None else ("yes" if v else "NO"))
            else:
                cells.append(_f(v, fmt))
        print(f"{label:34s}" + "".join(f"{c:>12s}" for c in cells))
    for d in dts:
        if summary[d].get("tiles_s"):
            tiles = ", ".join(f"{t}: {v * 1e3:.2f} ms" for t, v in summary[d]["tiles_s"].items())  # TILExWARPS
            print(f"fused kernel by tile size ({d}): {tiles}")
    print()
