"""`make demo` runs on the committed zoo and leaves a loadable merged checkpoint and a grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.checkpoint.load import load_checkpoint
from optimizer.zoo import paths

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built (evomerge zoo build)")
def test_demo_merges_zoo_specialists_scores_candidates_and_saves_the_best(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env["EVOMERGE_ZOO"] = str(paths.default_zoo_dir())
    done = subprocess.run([sys.executable, "-m", "optimizer.demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "candidate merges in place" in out and "best by CLIP score" in out
    for label in ("shape (alpha 0)", "colour (alpha 1)", "weighted sum 0.5"):
        assert label in out
    merged = tmp_path / "out" / "demo" / "merged.safetensors"
    assert load_checkpoint(merged).architecture == "sd1"
    assert (tmp_path / "out" / "demo" / "merged_grid.png").stat().st_size > 1000
