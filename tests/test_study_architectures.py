"""Studies on SD1, SD2 and SDXL tiny-topology parents, end to end (merge -> render -> score ->
export -> reload in diffusers), from LDM single files and from diffusers folders.

The OpenCLIP text towers of SD2 and SDXL store q/k/v fused (``in_proj``): the bound pipeline must
see them (and ``text_projection``) as views of the merge buffer, or trials render stale weights.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.testing.tiny_models import (
    tiny_config_dir,
    tiny_sd1_components,
    tiny_sd2_components,
    tiny_sdxl_components,
    write_tiny_diffusers,
    write_tiny_ldm,
)
from tests.test_architectures_dit import _sanity_gate_renders_the_parents
from tests.zoo_clip import ZOO_CLIP

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
BUILDERS = {"sd1": tiny_sd1_components, "sd2": tiny_sd2_components, "sdxl": tiny_sdxl_components}
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def _study(tmp: Path, *, parents: list[Path], config_dir: Path | None, name: str) -> Path:
    from optimizer.zoo.prompts import zoo_prompt_set_data

    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:2], held_out=prompts["held_out"][:2], steps=2, width=32, height=32)
    (tmp / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    study = {
        "name": name, "parents": [str(p) for p in parents],
        "search_space": {"alpha": {"low": 0.0, "high": 1.0}}, "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "none"}, "objectives": ["clip"], "scorers": dict(ZOO_CLIP),
        "prompts": "prompts.yaml", "render": {"batch_size": 2, "grid_images": 2}, "budget": {"trials": 2},
        "calibration": {"gate": False},  # random-weight tiny models render noise, which the sanity gate rightly refuses
    }
    if config_dir is not None:
        study["config_dir"] = str(config_dir)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _all_views(pipe, buffer: torch.Tensor) -> None:
    from optimizer.study.pipeline import refreshed_tensors

    low, high = buffer.data_ptr(), buffer.data_ptr() + buffer.numel() * buffer.element_size()
    assert refreshed_tensors(pipe) == ()
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            copies = [n for n, p in module.named_parameters() if not low <= p.data_ptr() < high]
            assert not copies, (name, copies[:3])


@pytest.mark.parametrize("source", ["ldm", "diffusers"])
@pytest.mark.parametrize("architecture", ["sd1", "sd2", "sdxl"])
def test_a_tiny_study_runs_on_every_sd_architecture_and_exports(architecture: str, source: str, tmp_path: Path) -> None:
    import diffusers

    from optimizer.merge import MergeRecipe
    from optimizer.study.config import load_study_config
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    a, b = BUILDERS[architecture](0), BUILDERS[architecture](1)
    config_dir = tiny_config_dir(a, architecture)
    if source == "ldm":
        files = [write_tiny_ldm(tmp_path / f"{n}.safetensors", m, architecture) for n, m in (("a", a), ("b", b))]
        study_config = config_dir
    else:
        files = [write_tiny_diffusers(tmp_path / n, m, architecture) for n, m in (("a", a), ("b", b))]
        study_config = None  # the first parent's own folder
    name = f"t-{architecture}-{source}"
    study_file = _study(tmp_path, parents=files, config_dir=study_config, name=name)
    out = tmp_path / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2

    trial_runner = StudyRunner(load_study_config(out / "study.yaml"), folder=StudyFolder(tmp_path / "replay"))
    pipe = trial_runner.renderer.pipe
    _all_views(pipe, trial_runner.technique.merger.output)
    layout = trial_runner.parents.bank.layout
    text_towers = [n for n in ("text_encoder", "text_encoder_2") if n in a]
    for alpha, parent in ((1.0, b), (0.0, a)):  # each merge is what the pipeline renders: no stale tensor
        trial_runner.technique.merger.merge(MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=alpha, merge_vae=True))
        for component in ("unet", *text_towers):
            live = getattr(pipe, component).state_dict()
            ref = parent[component].state_dict()
            assert all(torch.equal(live[k], ref[k]) for k in ref if "position_ids" not in k), (alpha, component)
    _sanity_gate_renders_the_parents(trial_runner, layout, merge_vae=True, tmp=tmp_path)

    best = study.best_trial
    for fmt, filename in (("safetensors", "best.safetensors"), ("diffusers", "best-diffusers")):
        result = runner.invoke(app, ["export", str(out), "--format", fmt, "-o", str(tmp_path / filename)])
        assert result.exit_code == 0, result.output
    from optimizer.study.space import suggest_recipe

    trial_runner.technique.merger.merge(suggest_recipe(optuna.trial.FixedTrial(best.params), trial_runner.space))
    expected = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", *text_towers)}
    cls = getattr(diffusers, PIPELINES[architecture])
    reloaded = [
        cls.from_single_file(str(tmp_path / "best.safetensors"), config=str(config_dir), local_files_only=True),
        cls.from_pretrained(str(tmp_path / "best-diffusers"), local_files_only=True),
    ]
    for loaded in reloaded:
        for component, state in expected.items():
            got = getattr(loaded, component).state_dict()
            assert all(torch.equal(got[k], v) for k, v in state.items() if "position_ids" not in k), component


def test_an_sdxl_study_without_a_matching_config_folder_is_one_clear_line(tmp_path: Path) -> None:
    a, b = tiny_sdxl_components(0), tiny_sdxl_components(1)
    files = [write_tiny_ldm(tmp_path / f"{n}.safetensors", m, "sdxl") for n, m in (("a", a), ("b", b))]
    study_file = _study(tmp_path, parents=files, config_dir=None, name="no-config")
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "do not fit the configs" in lines[0] and "shape" in lines[0]


def test_sd2_v_and_epsilon_parents_are_refused_and_a_v_study_renders_with_v_prediction(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from optimizer.study.config import load_study_config
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    a, b = tiny_sd2_components(0), tiny_sd2_components(1)
    v_file = write_tiny_ldm(tmp_path / "v768.safetensors", a, "sd2")
    (tmp_path / "v768.yaml").write_text("model:\n  params:\n    parameterization: v\n")  # A1111's config beside the file
    eps_file = tmp_path / "base512.safetensors"
    save_file(load_file(str(write_tiny_ldm(tmp_path / "raw.safetensors", b, "sd2"))), str(eps_file),
              metadata={"modelspec.prediction_type": "epsilon"})
    result = runner.invoke(app, ["merge", str(v_file), str(eps_file), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2 and "different targets" in result.output and "v_prediction" in result.output
    assert not (tmp_path / "out.safetensors").exists()

    # the shipped SD2 config is the 768-v one: two 512-base parents render with epsilon prediction
    eps_too = tmp_path / "base512b.safetensors"
    save_file(load_file(str(write_tiny_ldm(tmp_path / "raw2.safetensors", a, "sd2"))), str(eps_too),
              metadata={"modelspec.prediction_type": "epsilon"})
    config_dir = tiny_config_dir(a, "sd2")
    assert yaml.safe_load((config_dir / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    study_file = _study(tmp_path, parents=[eps_file, eps_too], config_dir=config_dir, name="eps-study")
    trial_runner = StudyRunner(load_study_config(study_file), folder=StudyFolder(tmp_path / "run"))
    assert trial_runner.renderer.pipe.scheduler.config.prediction_type == "epsilon"
    v_too = write_tiny_ldm(tmp_path / "v768b.safetensors", b, "sd2")
    (tmp_path / "v768b.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    study_file = _study(tmp_path, parents=[v_file, v_too], config_dir=config_dir, name="v-study")
    trial_runner = StudyRunner(load_study_config(study_file), folder=StudyFolder(tmp_path / "run-v"))
    assert trial_runner.renderer.pipe.scheduler.config.prediction_type == "v_prediction"


def test_comfyui_saved_v_prediction_files_merge_and_the_output_still_says_v(tmp_path: Path) -> None:
    """ComfyUI's ``state_dict_for_saving`` marks v-prediction models with an empty ``v_pred`` tensor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from optimizer.checkpoint.load import load_checkpoint

    a, b = tiny_sd2_components(0), tiny_sd2_components(1)
    files = []
    for name, modules in (("comfy_a", a), ("comfy_b", b)):
        tensors = load_file(str(write_tiny_ldm(tmp_path / f"raw_{name}.safetensors", modules, "sd2")))
        tensors["v_pred"] = torch.tensor([])
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        files.append(tmp_path / f"{name}.safetensors")
    loaded = load_checkpoint(files[0])
    assert loaded.prediction_type == "v_prediction" and "v_pred" not in loaded.state_dict
    assert loaded.layout.name == "sd2"

    out = tmp_path / "merged.safetensors"
    result = runner.invoke(app, ["merge", *map(str, files), "--alpha", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"
    assert load_checkpoint(out).prediction_type == "v_prediction"

    # a diffusers export of epsilon parents says epsilon although the config folder (768-v) says v
    eps = []
    for name, modules in (("e_a", a), ("e_b", b)):
        save_file(load_file(str(write_tiny_ldm(tmp_path / f"raw_{name}.safetensors", modules, "sd2"))),
                  str(tmp_path / f"{name}.safetensors"), metadata={"modelspec.prediction_type": "epsilon"})
        eps.append(tmp_path / f"{name}.safetensors")
    config_dir = tiny_config_dir(a, "sd2")
    folder = tmp_path / "merged-diffusers"
    result = runner.invoke(app, ["merge", *map(str, eps), "--alpha", "0.5", "--format", "diffusers",
                                 "--config", str(config_dir), "-o", str(folder)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert load_checkpoint(folder).prediction_type == "epsilon"

    # ComfyUI's scaled-fp8 files are refused in one line, not merged as if the fp8 values were weights
    tensors = load_file(str(files[0]))
    tensors["scaled_fp8"] = torch.tensor([])
    save_file(tensors, str(tmp_path / "fp8.safetensors"))
    result = runner.invoke(app, ["merge", str(tmp_path / "fp8.safetensors"), str(files[1]), "--alpha", "0.5",
                                 "-o", str(tmp_path / "fp8-out.safetensors")])
    assert result.exit_code == 2 and "scaled-fp8" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "fp8-out.safetensors").exists()


def test_the_readme_sdxl_study_is_a_valid_study_for_sdxl() -> None:
    import re

    from optimizer.architectures.layout import load_layout
    from optimizer.study.config import parse_study_config
    from optimizer.study.space import bind_space

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- sdxl-study:start -->\n```yaml\n(.*?)```\n<!-- sdxl-study:end -->", text, re.S)
    assert block is not None
    config = parse_study_config(yaml.safe_load(block.group(1)), source="README")
    assert config.architecture == "sdxl"
    space = bind_space(config.search_space, layout=load_layout("sdxl"), method=config.method, n_parents=2)
    assert len(space.dimensions) == 5
