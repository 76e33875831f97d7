#!/usr/bin/env python
"""Benchmark: what each technique around merging costs per trial, on the zoo (not a test).

Runners built exactly as a study builds them (:class:`optimizer.study.runner.StudyRunner`), one per
variant, all on the same parents (``shape`` + ``colour``, the zoo's LoRA/hypernetwork on top):

* ``merge``         weighted sum (the baseline);
* ``merge+lora``    plus the zoo LoRA (added in place by the kernel after the merge);
* ``merge+hyper``   plus the zoo hypernetwork (attention processor at render time);
* ``merge+recal``   plus AdaBN/REPAIR recalibration (one calibrated forward per trial);
* ``ensemble``      output ensemble of the two parents (no merge; two UNet calls per step).

For each: the median ``prepare`` time (merge / LoRA / recalibration / weights) over ``--reps``
trials with different alphas, and the median time to render ``--images`` search prompts, measured
round-robin (variant after variant, rep after rep) so background load hits all alike. Reported as
ratios to the ``merge`` variant's prepare and render times. Results: a table on stdout and
``bench/results/techniques-<hostname>-<date>.json``.

Example (2-core CPU, about 3 min): ``python bench/bench_techniques.py --reps 3 --images 8``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

if __package__:  # python -m bench.bench_techniques
    from . import _common as common
else:  # python bench/bench_techniques.py
    import _common as common

VARIANTS = ("merge", "merge+lora", "merge+hyper", "merge+recal", "ensemble")


def _config(variant: str, zoo: Path, images: int):
    from optimizer.study.config import parse_study_config
    from optimizer.zoo import paths
    from optimizer.zoo.adapters import adapter_file

    data = {
        "name": "bench",
        "parents": [str(paths.model_file(zoo, "shape")), str(paths.model_file(zoo, "colour"))],
        "search_space": {"alpha": {"share": "global"}},
        "objectives": ["clip"],
        "prompts": str(common.REPO / "studies" / "prompts" / "zoo-digits.yaml"),
        "budget": {"trials": 1},
        "render": {"grid_images": 0, "batch_size": images},
    }
    if variant == "merge+lora":
        data["loras"] = [{"path": str(adapter_file(zoo, "lora-colour")), "strength": 0.3}]
    if variant == "merge+hyper":
        data["hypernetworks"] = [{"path": str(adapter_file(zoo, "hyper-clean")), "strength": 1.0}]
    if variant == "merge+recal":
        data["recalibrate"] = {}
    if variant == "ensemble":
        data["technique"] = "output_ensemble"
    return parse_study_config(data, source=variant)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import optuna
    import torch

    from optimizer.study.runner import StudyRunner
    from optimizer.study.space import suggest_recipe
    from optimizer.study.storage import StudyFolder
    from optimizer.zoo import paths

    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = paths.default_zoo_dir()
    scratch = Path(tempfile.mkdtemp(prefix="bench-techniques-"))
    runners = {v: StudyRunner(_config(v, zoo, args.images), folder=StudyFolder(scratch / v)) for v in VARIANTS}
    prepare: dict[str, list[float]] = {v: [] for v in VARIANTS}
    render: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(args.reps):
        alpha = 0.2 + 0.6 * rep / max(1, args.reps - 1)
        for variant, runner in runners.items():
            recipe = suggest_recipe(optuna.trial.FixedTrial({"alpha": alpha}), runner.space)
            started = time.perf_counter()
            runner.prepare(recipe)
            prepare[variant].append(time.perf_counter() - started)
            jobs = runner.prompt_set.jobs("search")[: args.images]
            started = time.perf_counter()
            for _ in runner.renderer.batches(jobs):
                pass
            render[variant].append(time.perf_counter() - started)
    base_prepare = statistics.median(prepare["merge"])
    base_render = statistics.median(render["merge"])
    rows = []
    for v in VARIANTS:
        p, r = statistics.median(prepare[v]), statistics.median(render[v])
        rows.append({"variant": v, "prepare_s": p, "render_s": r, "prepare_vs_merge": p / base_prepare,
                     "render_vs_merge": r / base_render, "prepare_share_of_trial": p / (p + r)})
    print(f"{'variant':<12} {'prepare s':>10} {'render s':>9} {'prepare x':>10} {'render x':>9} {'prepare share':>14}")
    for row in rows:
        print(f"{row['variant']:<12} {row['prepare_s']:>10.4f} {row['render_s']:>9.3f} {row['prepare_vs_merge']:>10.2f} "
              f"{row['render_vs_merge']:>9.2f} {row['prepare_share_of_trial']:>14.1%}")
    result = {
        "benchmark": "techniques", "date": _dt.date.today().isoformat(), "host": socket.gethostname(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "device": "cpu", "images": args.images, "reps": args.reps, "steps": runners["merge"].prompt_set.steps, "rows": rows,
        "raw": {"prepare": prepare, "render": render},
    }
    out = common.write_json(common.result_path("techniques", date=result["date"]), result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
