"""A merge that changed nothing is caught: at study start (dimensions that cannot change the
weights are reported and pinned; identical parents are refused), per trial (images identical to
the previous trial's while the recipe differs are flagged), and by ``merge`` (output equal to a
parent). Also ``render.decoder: taesd`` really renders with TAESD."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optimizer.architectures.layout import load_layout
from optimizer.cli import app
from optimizer.study.config import load_study_config
from optimizer.study.loop import run_study
from optimizer.study.runner import StudyRunner
from optimizer.study.storage import StudyFolder
from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, write_tiny_ldm
from tests.zoo_clip import ZOO_CLIP

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TAESD = Path(__file__).resolve().parents[2] / "shared" / "assets" / "taesd"


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("noop")
    a = tiny_sd1_components(seed=0)
    p0 = write_tiny_ldm(root / "a.safetensors", a, "sd1")
    p1 = write_tiny_ldm(root / "b.safetensors", tiny_sd1_components(seed=1), "sd1")
    # c: b with a's middle block, so M00 is equal in a and c
    first, other = load_file(str(p0)), load_file(str(p1))
    owner = load_layout("sd1").assign(first.keys()).owner
    mixed = {k: (first[k] if owner[k] == "M00" else other[k]) for k in other}
    p2 = root / "c.safetensors"
    save_file(mixed, str(p2))
    return {"root": root, "a": p0, "b": p1, "c": p2, "config": tiny_config_dir(a, "sd1")}


def _study(folder: Path, *, parents: list[Path], config_dir: Path, render: dict | None = None, space: dict | None = None) -> Path:
    from optimizer.zoo.prompts import zoo_prompt_set_data

    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:2], held_out=prompts["held_out"][:1], steps=2, width=32, height=32)
    (folder / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    data = {
        "name": "noop", "parents": [str(p) for p in parents], "config_dir": str(config_dir),
        "search_space": space or {"alpha": {}}, "sampler": {"name": "random", "seed": 1}, "pruner": {"name": "none"},
        "objectives": ["clip"], "scorers": dict(ZOO_CLIP), "prompts": "prompts.yaml", "render": render or {"batch_size": 2, "grid_images": 1},
        "budget": {"trials": 2}, "calibration": {"gate": False},  # random-weight tiny models render noise (the gate refuses them)
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_block_equal_in_every_parent_is_reported_and_not_searched(parents: dict, tmp_path: Path) -> None:
    study_file = _study(tmp_path, parents=[parents["a"], parents["c"]], config_dir=parents["config"])
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "note: alpha.M00 is not searched: block(s) M00 are identical in every parent" in result.stderr
    study = optuna.load_study(study_name="noop", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert all("alpha.M00" not in t.params and "alpha.IN00" in t.params for t in study.trials)
    config = load_study_config(tmp_path / "run" / "study.yaml")
    replay = StudyRunner(config, folder=StudyFolder(tmp_path / "replay"))
    assert "alpha.M00" not in replay.space.names and len(replay.space.names) == 25
    from optimizer.study.space import suggest_recipe

    recipe = suggest_recipe(optuna.trial.FixedTrial(study.best_trial.params), replay.space)  # replays without the pinned one
    assert recipe.params["alpha"]["M00"] == 0.5


def test_identical_parents_are_refused_before_anything_is_created(parents: dict, tmp_path: Path) -> None:
    study_file = _study(tmp_path, parents=[parents["a"], parents["a"]], config_dir=parents["config"], space={"alpha": {"share": "global"}})
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2 and "nothing left to search" in result.stderr and "parents are identical" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "run").exists()


def test_a_trial_whose_images_did_not_change_is_flagged(parents: dict, tmp_path: Path, monkeypatch) -> None:
    config = load_study_config(_study(tmp_path, parents=[parents["a"], parents["b"]], config_dir=parents["config"],
                                      space={"alpha": {"share": "global"}}))
    study_runner = StudyRunner(config, folder=StudyFolder(tmp_path / "run"))
    real = study_runner.renderer.batches
    frozen: list = []

    def same_images(jobs):  # a renderer that ignores the weights (what a broken binding would do)
        for batch in real(jobs):
            if len(frozen) < 2:
                frozen.append(batch.images.clone())
            batch.images.copy_(frozen[len(frozen) - 2 if len(frozen) == 2 else 0][: len(batch.images)])
            yield batch

    monkeypatch.setattr(study_runner.renderer, "batches", same_images)
    notes: list[str] = []
    study = run_study(config, folder=StudyFolder(tmp_path / "run"), runner=study_runner, progress=False, notify=notes.append)
    first, second = study.trials
    assert first.params != second.params and "warning" not in first.user_attrs
    assert second.user_attrs["warning"] == "trial 1: images identical to trial 0's although the recipe differs"
    assert notes == [second.user_attrs["warning"]]
    from optimizer.study.report import trials_table

    assert "identical to trial 0" in trials_table(study).set_index("trial").loc[1, "note"]


def test_merge_warns_when_the_output_equals_a_parent(parents: dict, tmp_path: Path) -> None:
    out = tmp_path / "same.safetensors"
    result = runner.invoke(app, ["merge", str(parents["a"]), str(parents["b"]), "--alpha", "0", "-o", str(out)])
    assert result.exit_code == 0 and out.is_file()
    assert "warning: the merged weights equal parent 0 (a.safetensors): this recipe changes nothing" in result.stderr
    result = runner.invoke(app, ["merge", str(parents["a"]), str(parents["b"]), "--alpha", "0.3", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 0 and "warning" not in result.stderr
    result = runner.invoke(app, ["merge", str(parents["a"]), str(parents["b"]), "-o", str(tmp_path / "y.safetensors")])
    assert result.exit_code == 0 and "not given, the method's default for every block: alpha 0.5" in result.stdout


def test_merge_of_a_nonfinite_parent_needs_allow_nonfinite(parents: dict, tmp_path: Path) -> None:
    state = load_file(str(parents["b"]))
    key = sorted(k for k in state if k.startswith("model.diffusion_model.out."))[0]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "merged.safetensors"
    result = runner.invoke(app, ["merge", str(parents["a"]), str(bad), "--alpha", "0.5", "-o", str(out)])
    assert result.exit_code == 2 and key in result.stderr and not out.exists()
    result = runner.invoke(app, ["merge", str(parents["a"]), str(bad), "--alpha", "0.5", "-o", str(out), "--allow-nonfinite"])
    assert result.exit_code == 0 and torch.isnan(load_file(str(out))[key]).any()


@pytest.mark.skipif(not (TAESD / "taesd_decoder.safetensors").is_file(), reason="../shared/assets/taesd is not available")
def test_render_decoder_taesd_renders_with_taesd(parents: dict, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from optimizer.merge import MergeRecipe

    images = {}
    for decoder in ("vae", "taesd"):
        folder = tmp_path / decoder
        folder.mkdir()
        render = {"batch_size": 2, "grid_images": 1, "decoder": decoder, **({"taesd": str(TAESD)} if decoder == "taesd" else {})}
        config = load_study_config(_study(folder, parents=[parents["a"], parents["b"]], config_dir=parents["config"], render=render))
        study_runner = StudyRunner(config, folder=StudyFolder(folder / "run"))
        assert isinstance(study_runner.renderer.pipe.vae, AutoencoderTiny if decoder == "taesd" else AutoencoderKL)
        study_runner.prepare(MergeRecipe.uniform(method="weighted_sum", layout=study_runner.space.layout, alpha=0.5))
        images[decoder] = study_runner.renderer.render(study_runner.prompt_set.jobs("search"))
    assert images["taesd"].shape == images["vae"].shape
    assert (images["taesd"] - images["vae"]).abs().mean() > 1e-3  # another decoder made these
