"""`make demo` runs a real study on the committed zoo and leaves a recipe, a checkpoint and a report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from optimizer.checkpoint.load import load_checkpoint
from optimizer.zoo import paths

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built (evomerge zoo build)")
def test_demo_runs_a_study_compares_on_held_out_prompts_and_exports_the_best(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.update(EVOMERGE_ZOO=str(paths.default_zoo_dir()), EVOMERGE_DEMO_TRIALS="5", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "optimizer.zoo.demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "5 trials in" in out and "held-out prompts (never seen by the search)" in out
    for label in ("shape (parent A)", "colour (parent B)", "weighted sum 0.5", "best (trial"):
        assert label in out
    folder = tmp_path / "out" / "demo" / "zoo-shape-colour"
    assert load_checkpoint(folder / "exports" / "best.safetensors").architecture == "sd1"
    assert yaml.safe_load((folder / "exports" / "best.yaml").read_text())["evomerge_recipe"] == 1
    assert (folder / "best_held_out.png").stat().st_size > 1000 and (folder / "report" / "block_weights.png").is_file()
    assert "evomerge dashboard" in out
