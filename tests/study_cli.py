"""Shared by the tests that run `evomerge` in subprocesses: a small zoo prompt set, the command, the env."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: six search and four held-out zoo captions, 6 steps: a trial takes well under a second on CPU
PROMPTS = {
    "search": [
        "a bold upright red digit 0 on a black background",
        "a thin italic blue digit 2 on a black background",
        "a bold upright green digit 6 on a gray background",
        "a thin upright yellow digit 5 on a black background",
        "a bold italic white digit 5 on a black background",
        "a thin italic green digit 2 on a white background",
    ],
    "held_out": [
        "a bold upright green digit 3 on a black background",
        "a thin upright blue digit 1 on a white background",
        "a bold upright yellow digit 2 on a gray background",
        "a thin upright white digit 5 on a black background",
    ],
    "seeds": [0],
    "steps": 6,
    "guidance": 4.0,
    "width": 32,
    "height": 32,
    "scheduler": "dpmpp_2m",
}


def evomerge_command() -> list[str]:
    """The installed `evomerge` script next to this interpreter, else `python -m optimizer.cli`."""
    script = Path(sys.executable).with_name("evomerge")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "optimizer.cli"]


def subprocess_env() -> dict[str, str]:
    """The environment with the repository importable, offline, and one torch thread per process:
    several processes on a small CI machine otherwise oversubscribe the cores and a 0.3 s trial
    takes seconds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env
