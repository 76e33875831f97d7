"""Studies with the techniques around merging: LoRA and hypernetwork strengths as search dimensions,
the output ensemble, and AdaBN/REPAIR-style recalibration after the merge (on the embedded zoo)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from optimizer.study.config import StudyConfigError, load_study_config
from optimizer.study.loop import run_study
from optimizer.study.runner import StudyRunner
from optimizer.study.space import suggest_recipe
from optimizer.study.storage import StudyFolder
from optimizer.zoo import paths
from tests.test_lora import _random_zoo_lora
from tests.zoo_study import needs_zoo, zoo_study_data

ZOO = paths.default_zoo_dir()
pytestmark = [needs_zoo, pytest.mark.usefixtures("one_thread")]



def _as_exported(state: dict, runner) -> dict:
    """A CPU study's weights as export writes them: cast to the parents' stored dtype (fp16 for the zoo)."""
    dtype = getattr(torch, runner.parents.stored_dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

def _hypernetwork(tmp: Path, *, seed: int = 0, scale: float = 1.0) -> Path:
    from optimizer.adapters.hypernetwork import Hypernetwork, save_hypernetwork

    h = Hypernetwork.new(dims=[32, 64], name="h", seed=seed)
    with torch.no_grad():
        for p in h.parameters():
            p.mul_(scale)
    return save_hypernetwork(h, tmp / f"hyper-{seed}.pt")


def _config(tmp: Path, **overrides):
    data = zoo_study_data(tmp, **overrides)
    data["parents"] = [str(paths.model_file(ZOO, "base")), str(paths.model_file(ZOO, "shape"))]
    data.update(overrides)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_study_config(path)


def _render(runner: StudyRunner, recipe) -> torch.Tensor:
    runner.prepare(recipe)
    jobs = runner.prompt_set.jobs("search")[:3]
    return torch.cat([b.images for b in runner.renderer.batches(jobs)])


def test_lora_strengths_are_search_dimensions_replayed_and_exported(tmp_path: Path) -> None:
    lora = _random_zoo_lora(tmp_path, seed=5)
    config = _config(
        tmp_path,
        search_space={"alpha": {"share": "global"}},
        loras=[{"path": str(lora), "name": "rnd", "strength": {"low": 0.0, "high": 1.0, "share": "per_block", "groups": {"OUT": [f"OUT{i:02d}" for i in range(3, 12)]}}}],
        budget={"trials": 2},
    )
    folder = StudyFolder(tmp_path / "run")
    runner = StudyRunner(config, folder=folder)
    names = runner.space.names
    assert "alpha" in names and "lora.rnd.OUT" in names and "lora.rnd.IN01" in names and "lora.rnd.OUT00" not in names
    study = run_study(config, folder=folder, progress=False, runner=runner)
    best = study.best_trial
    recipe = suggest_recipe(optuna.trial.FixedTrial(best.params), runner.space)
    assert recipe.loras["rnd"]["OUT05"] == best.params["lora.rnd.OUT"]
    assert best.user_attrs["recipe"]["loras"] == recipe.model_dump(mode="json")["loras"]
    assert "lora" in best.user_attrs["seconds"]

    from optimizer.study.export import export_trial

    out = export_trial(study=study, config=config, trial=best, output_format="safetensors", output=tmp_path / "best.safetensors", parents=runner.parents)
    runner.prepare(recipe)
    saved = load_file(str(out))
    views = _as_exported(runner.technique.merger.state_dict(), runner)  # written in the fp16 parents' dtype
    assert all(torch.equal(saved[k], v) for k, v in views.items())
    without = runner.technique.merger.merge(recipe.model_copy(update={"loras": {}}))
    assert without.lora_layers == 0
    assert any(not torch.equal(saved[k], v) for k, v in _as_exported(runner.technique.merger.state_dict(), runner).items())  # the LoRA is in the file
    doc = yaml.safe_load(export_trial(study=study, config=config, trial=best, output_format="recipe", output=tmp_path / "best.yaml").read_text())
    assert doc["loras"][0]["name"] == "rnd" and len(doc["loras"][0]["sha256"]) == 64
    _replays_to_the_same_bytes(tmp_path / "best.yaml", out, tmp_path / "replayed.safetensors")


def test_a_lora_strength_that_adds_nothing_is_reported_and_not_searched(tmp_path: Path) -> None:
    """A LoRA whose factors are zero in the OUT blocks (a LoRA "that maps to nothing" there): its
    OUT strength cannot change the weights, so it is pinned with a note; IN01 is still searched."""
    from safetensors.torch import save_file

    lora = _random_zoo_lora(tmp_path, seed=7)
    tensors = load_file(str(lora))
    zeroed = {k: (torch.zeros_like(v) if "up_blocks" in k and "lora_B" in k else v) for k, v in tensors.items()}
    assert any("up_blocks" in k and "lora_B" in k for k in tensors)
    dead = tmp_path / "dead-out.safetensors"
    from safetensors import safe_open

    with safe_open(str(lora), framework="pt") as handle:
        save_file(zeroed, str(dead), metadata=handle.metadata())
    config = _config(
        tmp_path,
        search_space={"alpha": {"share": "global"}},
        loras=[{"path": str(dead), "name": "rnd", "strength": {"low": 0.0, "high": 1.0, "share": "per_block", "groups": {"OUT": [f"OUT{i:02d}" for i in range(3, 12)]}}}],
        budget={"trials": 1},
    )
    runner = StudyRunner(config, folder=StudyFolder(tmp_path / "run"))
    assert "lora.rnd.OUT" not in runner.space.names and "lora.rnd.IN01" in runner.space.names
    assert any(n.startswith("lora.rnd.OUT is not searched: LoRA 'rnd' adds nothing to block(s) OUT03") for n in runner.notes), runner.notes


def test_lbw_string_scales_one_global_lora_strength(tmp_path: Path) -> None:
    lora = _random_zoo_lora(tmp_path, seed=6)
    config = _config(tmp_path, search_space={"alpha": {"value": 0.5}}, loras=[{"path": str(lora), "lbw": "OUTALL"}])
    runner = StudyRunner(config, folder=StudyFolder(tmp_path / "run"))
    assert runner.space.names == [f"lora.{lora.stem}"]
    recipe = suggest_recipe(optuna.trial.FixedTrial({f"lora.{lora.stem}": 0.8}), runner.space)
    strengths = recipe.loras[lora.stem]
    assert strengths["IN01"] == 0.0 and strengths["M00"] == 0.0 and strengths["OUT03"] == pytest.approx(0.8)


def test_hypernetwork_strength_changes_the_images_and_zero_is_the_plain_merge(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        search_space={"alpha": {"value": 0.5}},
        hypernetworks=[{"path": str(_hypernetwork(tmp_path, scale=30.0)), "name": "hn", "strength": {"low": 0.0, "high": 1.0}}],
    )
    runner = StudyRunner(config, folder=StudyFolder(tmp_path / "run"))
    assert runner.space.names == ["hypernetwork.hn"]
    at = {s: suggest_recipe(optuna.trial.FixedTrial({"hypernetwork.hn": s}), runner.space) for s in (0.0, 1.0)}
    with_zero, with_one = _render(runner, at[0.0]), _render(runner, at[1.0])
    assert (with_zero - with_one).abs().max() > 0.02

    (tmp_path / "plain").mkdir()
    plain = _config(tmp_path / "plain", search_space={"alpha": {"value": 0.5}})
    plain_runner = StudyRunner(plain, folder=StudyFolder(tmp_path / "run-plain"))
    assert torch.equal(_render(plain_runner, suggest_recipe(optuna.trial.FixedTrial({}), plain_runner.space)), with_zero)


def test_output_ensemble_with_weight_zero_renders_the_first_parent_and_is_not_exportable(tmp_path: Path) -> None:
    config = _config(tmp_path, technique="output_ensemble", search_space={"alpha": {"share": "global"}}, budget={"trials": 1})
    folder = StudyFolder(tmp_path / "run")
    runner = StudyRunner(config, folder=folder)
    assert not runner.technique.exports_weights and runner.space.names == ["alpha"]
    first = _render(runner, suggest_recipe(optuna.trial.FixedTrial({"alpha": 0.0}), runner.space))
    assert runner.technique.ensemble.weights == (1.0, 0.0)

    (tmp_path / "single").mkdir()
    single = _config(tmp_path / "single", search_space={"alpha": {"value": 0.0}})
    merged_runner = StudyRunner(single, folder=StudyFolder(tmp_path / "run-single"))
    assert torch.equal(_render(merged_runner, suggest_recipe(optuna.trial.FixedTrial({}), merged_runner.space)), first)

    calls = runner.technique.ensemble.calls
    _render(runner, suggest_recipe(optuna.trial.FixedTrial({"alpha": 0.4}), runner.space))
    assert runner.technique.ensemble.weights == (0.6, 0.4)
    steps = runner.prompt_set.steps
    assert runner.technique.ensemble.calls - calls >= 2 * steps  # both parents at every step

    study = run_study(config, folder=folder, progress=False, runner=runner)
    from optimizer.study.export import ExportError, export_trial

    for fmt in ("safetensors", "mbw", "diffusers"):  # an ensemble is no merge: no MBW string "method weighted_sum" either
        with pytest.raises(ExportError, match="output ensemble.*not a merge.*--format recipe"):
            export_trial(study=study, config=config, trial=study.best_trial, output_format=fmt, output=tmp_path / "x.out", parents=runner.parents)
    assert not (tmp_path / "x.out").exists()
    from optimizer.cli import export_hint

    hint = export_hint(config, folder.root)
    assert "--format recipe" in hint and "safetensors" not in hint  # the hint names an export that works
    doc = tmp_path / "ensemble.yaml"
    export_trial(study=study, config=config, trial=study.best_trial, output_format="recipe", output=doc, parents=runner.parents)
    assert "technique: output_ensemble" in doc.read_text()


def test_recalibration_meets_the_interpolated_parent_statistics_and_is_exported(tmp_path: Path) -> None:
    from optimizer.merge.recalibrate import collect_norm_statistics

    config = _config(
        tmp_path,
        parents=[str(paths.model_file(ZOO, "base")), str(paths.model_file(ZOO, "other_init"))],
        search_space={"alpha": {"share": "global"}},
        recalibrate={"prompts": 2, "timesteps": [999, 500]},
        budget={"trials": 1},
    )
    folder = StudyFolder(tmp_path / "run")
    runner = StudyRunner(config, folder=folder)
    recipe = suggest_recipe(optuna.trial.FixedTrial({"alpha": 0.5}), runner.space)
    seconds = runner.prepare(recipe)
    assert seconds["recalibrate"] > 0
    recal = runner.technique.recalibrator
    layers = [l.name for l in recal.layers]
    got = collect_norm_statistics(unet=recal.pipe.unet, batch=recal.batch(), layers=layers)
    a, b = recal.parent_stats
    for name in layers:
        torch.testing.assert_close(got[name].std, 0.5 * (a[name].std + b[name].std), rtol=1e-3, atol=1e-4)
    study = run_study(config, folder=folder, progress=False, runner=runner)
    assert "recalibrate" in study.best_trial.user_attrs["seconds"]

    from optimizer.study.export import export_trial

    out = export_trial(study=study, config=config, trial=study.best_trial, output_format="safetensors", output=tmp_path / "best.safetensors", parents=runner.parents, runner=runner)
    runner.prepare(suggest_recipe(optuna.trial.FixedTrial(study.best_trial.params), runner.space))
    saved = load_file(str(out))
    assert all(torch.equal(saved[k], v) for k, v in _as_exported(runner.technique.merger.state_dict(), runner).items())
    with safe_open(str(out), "pt") as handle:
        assert "alpha" in handle.metadata()["sd_merge_recipe"]
    recipe = export_trial(study=study, config=config, trial=study.best_trial, output_format="recipe", output=tmp_path / "best.yaml")
    assert yaml.safe_load(recipe.read_text())["study_file"]["recalibrate"] is not None
    _replays_to_the_same_bytes(recipe, out, tmp_path / "replayed.safetensors")


def _replays_to_the_same_bytes(recipe: Path, exported: Path, output: Path) -> None:
    """``evomerge replay`` of the exported recipe writes the exported checkpoint's bytes."""
    import hashlib

    from typer.testing import CliRunner

    from optimizer.cli import app

    result = CliRunner().invoke(app, ["replay", str(recipe), "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(output.read_bytes()).hexdigest() == hashlib.sha256(exported.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"technique": "output_ensemble", "loras": [{"path": "x.safetensors"}]}, "output_ensemble merges no weights"),
        ({"technique": "output_ensemble", "search_space": {"alpha": {}}}, "an output ensemble has one weight; set share: global"),
        ({"method": "add_difference", "recalibrate": {}}, "recalibrate: the target statistics"),
        ({"hypernetworks": [{"path": "h.pt", "strength": {"share": "per_block"}}]}, "a hypernetwork has one strength"),
        ({"loras": [{"path": "a/x.safetensors"}, {"path": "b/x.safetensors"}]}, "names must be unique"),
        ({"search_space": {}}, "nothing is searched"),
        ({"loras": [{"path": "x.safetensors", "lbw": "OUTALL", "strength": {"share": "per_block"}}]}, "lbw scales one global strength"),
    ],
)
def test_bad_technique_settings_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(StudyConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, **change)
