"""Helpers shared by the benchmark scripts in ``bench/`` (not a test, not part of the package).

Importing this module puts the repository root on ``sys.path``, so that ``optimizer`` and
``objectives`` import without an editable install, whether a script runs as
``python bench/bench_X.py`` (its directory is on ``sys.path``: ``import _common``) or as
``python -m bench.bench_X`` (``from ._common import ...``).

torch is imported lazily, inside the functions that need it: importing this module stays cheap.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "BENCH_DIR",
    "REPO",
    "RESULTS_DIR",
    "cuda_sync",
    "loadavg",
    "machine_info",
    "package_version",
    "proc_status_bytes",
    "reset_hwm",
    "result_path",
    "run_worker",
    "timed",
    "timing_stats",
    "write_json",
]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO) not in sys.path:  # allow `python bench/bench_X.py` without an editable install
    sys.path.insert(0, str(REPO))

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# process memory and machine load (Linux /proc)


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (``"VmRSS"``: current RSS, ``"VmHWM"``:
    peak RSS since start or since :func:`reset_hwm`); 0 if the field is absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> bool:
    """Reset the peak-RSS counter ``VmHWM`` to the current RSS (Linux >= 4.0:
    ``echo 5 > /proc/self/clear_refs``). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages rounded to 0.01, or None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# timing


def cuda_sync(device: Any) -> None:
    """``torch.cuda.synchronize(device)`` when ``device`` (a str or ``torch.device``) is CUDA;
    nothing on CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], *, device: Any, cuda_events: bool = False) -> tuple[T, float]:
    """``(fn(), seconds)``.

    By default wall clock (``time.perf_counter``) between two :func:`cuda_sync` calls. With
    ``cuda_events=True`` on CUDA, the time between two CUDA events recorded around ``fn`` (after
    a synchronize); on CPU ``cuda_events`` changes nothing."""
    cuda_sync(device)
    if cuda_events and str(device).startswith("cuda"):
        import torch

        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        value = fn()
        end.record()
        end.synchronize()
        return value, start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    value = fn()
    cuda_sync(device)
    return value, time.perf_counter() - t0


def timing_stats(times: Sequence[float], *, warmup: int | None = None) -> dict[str, Any]:
    """``{"median_s", "min_s", "max_s", ["reps", "warmup",] "all_s"}`` of ``times`` (seconds);
    ``reps`` (``len(times)``) and ``warmup`` only when ``warmup`` is given."""
    out: dict[str, Any] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
    if warmup is not None:
        out.update(reps=len(times), warmup=warmup)
    out["all_s"] = list(times)
    return out


# --------------------------------------------------------------------------------------------
# environment


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None if it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(*, device: str | None = None, packages: Sequence[str] = ("diffusers", "evomerge")) -> dict[str, Any]:
    """Host, CPU, memory, Python and torch facts for a results file.

    With ``device``, a ``"device"`` entry is added and ``"cuda_device"`` names GPU 0 only when
    ``device`` is CUDA; without it, whenever CUDA is available. Then one entry per distribution
    in ``packages`` (its version or None), keyed by the name with ``-`` replaced by ``_``."""
    import torch

    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_model": None,
        "mem_total_bytes": None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
    }
    if device is not None:
        info["device"] = device
        has_cuda = device.startswith("cuda")
    else:
        has_cuda = torch.cuda.is_available()
    info["cuda_device"] = torch.cuda.get_device_name(0) if has_cuda else None
    for dist in packages:
        info[dist.replace("-", "_")] = package_version(dist)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_bytes"] = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------------------------
# worker subprocesses and results files


def run_worker(script: str | Path, args: Sequence[str]) -> tuple[dict[str, Any], int]:
    """Run ``python script *args --_out FILE`` in the repository root and return
    ``(result, exit status)``.

    ``result`` is the JSON object the worker wrote to ``FILE`` plus ``"wall_s"``, or
    ``{"error": "worker exited N", "wall_s": ...}`` when it failed. ``FILE`` is deleted."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(script).resolve()), *args, "--_out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"error": f"worker exited {proc.returncode}", "wall_s": wall}, proc.returncode
        res = json.loads(out.read_text())
        res["wall_s"] = wall
        return res, 0
    finally:
        out.unlink(missing_ok=True)


def result_path(name: str, *, date: str | None = None) -> Path:
    """The default results file ``bench/results/<name>-<hostname>-<date>.json`` (date: today)."""
    return RESULTS_DIR / f"{name}-{socket.gethostname()}-{date or _dt.date.today().isoformat()}.json"


def write_json(path: Path, data: Any, *, indent: int = 2, default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as JSON (plus a final newline) to ``path``, creating its folder; atomic
    (a temporary file renamed over ``path``). Returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=default) + "\n")
    tmp.replace(path)
    return path
