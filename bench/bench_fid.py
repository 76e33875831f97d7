#!/usr/bin/env python
"""Benchmark: the FID compute step, torchmetrics against :mod:`objectives.frechet` (not a test).

Both compute the same FID from the same 2048-d features (seeded random features: the cost does not
depend on the values): torchmetrics' ``FrechetInceptionDistance.compute`` (an ``eigvals`` of the
``2048 x 2048`` product ``S_r S_g``) and :func:`objectives.frechet.frechet_distance` (an
``n x n`` ``eigvalsh`` when there are ``n <= 2048`` generated images). Side by side in one run, for
``--generated`` image counts against ``--reference`` reference images; the feature extraction
(Inception forward) is the same for both and is not timed. Reported: seconds, the ratio, and the
relative difference of the two values.

Results: a table on stdout and ``bench/results/fid-<hostname>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os

if __package__:  # python -m bench.bench_fid
    from . import _common as common
else:  # python bench/bench_fid.py
    import _common as common

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


class _Fixed(torch.nn.Module):
    """Feature "network" returning precomputed rows in order (the features are given, not extracted)."""

    num_features = 2048

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows, self.at = rows, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.rows[self.at : self.at + len(images)]
        self.at += len(images)
        return out


def measure(*, generated: int, reference: int, reps: int) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from objectives.frechet import frechet_distance

    g = torch.Generator().manual_seed(generated)
    real = torch.randn(reference, 2048, generator=g, dtype=torch.float64)
    fake = torch.randn(generated, 2048, generator=g, dtype=torch.float64) * 1.1 + 0.05
    metric = FrechetInceptionDistance(feature=_Fixed(torch.cat([real, fake]).float()), normalize=True, reset_real_features=False)
    metric.update(torch.zeros(reference, 3, 8, 8), real=True)
    metric.update(torch.zeros(generated, 3, 8, 8), real=False)
    real32 = real.float().double()  # torchmetrics sees the float32 rows
    mean, centred = real32.mean(0), real32 - real32.mean(0)
    cov = centred.T @ centred / (reference - 1)
    ours_times, theirs_times = [], []
    for _ in range(reps):
        value_theirs, t = common.timed(lambda: float(metric.compute()), device="cpu")
        metric._computed = None  # torchmetrics caches compute(): time it again
        theirs_times.append(t)
        value_ours, t = common.timed(lambda: frechet_distance(mean=mean, cov=cov, features=fake.float().double()), device="cpu")
        ours_times.append(t)
    theirs, ours = common.timing_stats(theirs_times), common.timing_stats(ours_times)
    return {"generated": generated, "reference": reference, "torchmetrics": theirs, "frechet": ours,
            "speedup": theirs["median_s"] / ours["median_s"], "relative_difference": abs(value_ours - value_theirs) / abs(value_theirs),
            "fid_torchmetrics": value_theirs, "fid_frechet": value_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generated", type=int, nargs="+", default=[16, 100, 400])
    parser.add_argument("--reference", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = [measure(generated=n, reference=args.reference, reps=args.reps) for n in args.generated]
    print(f"{'generated':>9} {'torchmetrics s':>15} {'frechet s':>10} {'speedup':>8} {'rel. diff':>10}")
    for r in rows:
        print(f"{r['generated']:>9} {r['torchmetrics']['median_s']:>15.3f} {r['frechet']['median_s']:>10.4f} {r['speedup']:>7.0f}x "
              f"{r['relative_difference']:>10.2e}")
    path = common.write_json(common.result_path("fid"), {"machine": common.machine_info(device="cpu"), "load": common.loadavg(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
