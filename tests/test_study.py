"""Studies on the embedded zoo: config validation, the search space, run/record/report/export,
replay of an exported recipe, failed trials, Pareto studies (resume: test_study_resume.py)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from optimizer.architectures.layout import load_layout
from optimizer.cli import app
from optimizer.study.config import ParamSpace, StudyConfigError, WarmStart, load_study_config, parse_study_config
from optimizer.study.space import bind_space, suggest_recipe, warm_start_params
from optimizer.zoo import paths
from tests.zoo_clip import ZOO_CLIP
from tests.zoo_study import needs_zoo, write_zoo_study, zoo_study_data

REPO = Path(__file__).resolve().parents[1]
ZOO = paths.default_zoo_dir()
SD1 = load_layout("sd1")
runner = CliRunner()



# ------------------------------------------------------------------------------------ study file
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"parents": ["a.safetensors"]}, "parents: List should have at least 2 items"),
        ({"method": "average"}, "method: unknown merge method"),
        ({"sampler": {"name": "bayes"}}, "sampler.name: unknown sampler 'bayes'"),
        ({"objectives": ["clip", "clip"]}, "each objective once"),
        ({"objectives": ["sharpness"]}, "objectives[0].name: unknown objective 'sharpness'"),
        ({"objectives": ["clip", "fid"], "mode": "pareto", "pruner": {"name": "none"}}, "scorers.reference"),
        ({"objectives": ["clip", "kid"], "mode": "pareto", "pruner": {"name": "median"}, "scorers": {"reference": "r"}}, "Optuna cannot prune multi-objective"),
        ({"search_space": {"alpha": {"low": 1, "high": 0}}}, "search_space.alpha: low (1.0) must be below high (0.0)"),
        ({"budget": {}}, "budget: give trials and/or seconds"),
        ({"budget": {"trials": 0}}, "budget.trials: Input should be greater than or equal to 1"),
        ({"warm_start": [{"uniform": 0.5, "mbw": "1"}]}, "warm_start[0]: a warm start is exactly one of"),
        ({"render": {"decoder": "taesd"}}, "render.taesd"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"name": "a b"}, "name: String should match pattern"),
    ],
)
def test_bad_study_files_name_the_field(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(StudyConfigError) as info:
        parse_study_config(zoo_study_data(tmp_path, **change), source="s.yaml", base=tmp_path)
    assert message in str(info.value) and str(info.value).startswith("s.yaml: ")


def test_study_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = load_study_config(write_zoo_study(tmp_path, parents=["models/a.safetensors", "/abs/b.safetensors"]))
    assert config.parents == [str((tmp_path / "models/a.safetensors").resolve()), "/abs/b.safetensors"]
    assert config.prompts == str((tmp_path / "prompts.yaml").resolve())
    with pytest.raises(StudyConfigError, match="no study file"):
        load_study_config(tmp_path / "missing.yaml")


def test_committed_studies_are_valid() -> None:
    for path in sorted((REPO / "studies").glob("*.yaml")):
        config = load_study_config(path)
        assert all(Path(p).is_file() for p in config.parents), path


# ---------------------------------------------------------------------------------- search space
def test_space_groups_fixed_and_replay_with_fixed_trial() -> None:
    spec = ParamSpace(groups={"IN": [f"IN{i:02d}" for i in range(12)]}, fixed={"BASE": 0.25, "M00": 0.75})
    space = bind_space({"alpha": spec}, layout=SD1, method="weighted_sum", n_parents=2)
    assert space.names == ["alpha.IN"] + [f"alpha.OUT{i:02d}" for i in range(12)]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    trial = study.ask()
    recipe = suggest_recipe(trial, space)
    alpha = recipe.params["alpha"]
    assert alpha["BASE"] == 0.25 and alpha["M00"] == 0.75
    assert len({alpha[f"IN{i:02d}"] for i in range(12)}) == 1
    assert suggest_recipe(optuna.trial.FixedTrial(trial.params), space) == recipe  # pure function of the trial
    glob = bind_space({"alpha": ParamSpace(share="global")}, layout=SD1, method="weighted_sum", n_parents=2)
    assert glob.names == ["alpha"]
    ties = bind_space({"density": ParamSpace(low=0.1, high=0.9, step=0.1)}, layout=SD1, method="ties", n_parents=3)
    recipe = suggest_recipe(optuna.trial.FixedTrial({f"density.{b}": 0.3 for b in SD1.blocks}), ties)
    assert recipe.params["alpha"]["IN05"] == 1.0 and recipe.params["density"]["IN05"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("spec", "method", "message"),
    [
        ({"alpha": ParamSpace(groups={"IN": ["IN12"]})}, "weighted_sum", "search_space.alpha.groups.IN: unknown block 'IN12'"),
        ({"alpha": ParamSpace(groups={"A": ["IN00"], "B": ["IN00"]})}, "weighted_sum", "already in group A"),
        ({"alpha": ParamSpace(fixed={"MID": 0.5})}, "weighted_sum", "search_space.alpha.fixed.MID: not a block"),
        ({"beta": ParamSpace()}, "weighted_sum", "has no parameter 'beta'"),
        ({"density": ParamSpace(low=0.0, high=1.0)}, "ties", "search_space.density.low: density must be in (0, 1]"),
    ],
)
def test_bad_search_spaces_name_the_field(spec: dict, method: str, message: str) -> None:
    with pytest.raises(StudyConfigError) as info:
        bind_space(spec, layout=SD1, method=method, n_parents=2 if method != "ties" else 3)
    assert message in str(info.value)


def test_warm_starts() -> None:
    space = bind_space({"alpha": ParamSpace(groups={"IN": [f"IN{i:02d}" for i in range(12)]})}, layout=SD1, method="weighted_sum", n_parents=2)
    mbw = "0.5," + ",".join(["1"] * 12) + ",0.5," + ",".join(["0"] * 12)
    uniform, a, b, hand = warm_start_params(space, [WarmStart(uniform=0.5), WarmStart(parents=True), WarmStart(mbw=mbw)])
    assert set(uniform.values()) == {0.5} and set(a.values()) == {0.0} and set(b.values()) == {1.0}
    assert hand["alpha.IN"] == 1.0 and hand["alpha.OUT05"] == 0.0 and hand["alpha.BASE"] == 0.5
    assert suggest_recipe(optuna.trial.FixedTrial(hand), space).to_mbw(layout=SD1) == ",".join(f"{float(v):g}" for v in mbw.split(","))
    with pytest.raises(StudyConfigError, match="share alpha.IN but the MBW string gives them"):
        warm_start_params(space, [WarmStart(mbw="0.5,1,0" + ",1" * 10 + ",0.5" + ",0" * 12)])
    with pytest.raises(StudyConfigError, match="outside the searched range"):
        warm_start_params(space, [WarmStart(uniform=1.5)])


# ------------------------------------------------------------------------------ running a study
@needs_zoo
def test_short_zoo_study_records_trials_reports_and_exports_a_replayable_recipe(tmp_path: Path) -> None:
    study_file = write_zoo_study(tmp_path, warm_start=["parents"], budget={"trials": 3})
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    assert "best: trial" in result.output and "evomerge dashboard" in result.output
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="test-study", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 3
    first = trials[0]
    assert first.params == {n: 0.0 for n in first.params}  # the enqueued parent A
    assert set(first.user_attrs) >= {"recipe", "mbw", "values", "seconds", "images", "grid_artifact", "worker"}
    assert first.user_attrs["worker"] == {"host": socket.gethostname(), "pid": os.getpid(), "device": "cpu", "threads": 1}
    assert first.user_attrs["images"] == 6 and first.value == first.user_attrs["values"]["clip"]
    assert (out / "artifacts" / first.user_attrs["grid_artifact"]).read_bytes().startswith(b"\x89PNG")
    for name in ("trials.csv", "trials.md", "history.png", "importances.png", "block_weights.png"):
        assert (out / "report" / name).stat().st_size > 100, name
    assert "COMPLETE" in (out / "report" / "trials.md").read_text()

    # export: recipe, MBW, merged safetensors; the recipe replays to exactly the trial's weights
    best = study.best_trial
    for fmt, name in (("recipe", "best.yaml"), ("mbw", "best.txt"), ("safetensors", "best.safetensors")):
        result = runner.invoke(app, ["export", str(out), "--format", fmt, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert f"trial {best.number}" in result.output
    doc = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert doc["trial"] == best.number and doc["dtype"] == "float32" and len(doc["parents"][0]["sha256"]) == 64
    assert doc["output_dtype"] == "float16"  # computed in fp32 on CPU, written in the fp16 zoo parents' dtype
    assert best.user_attrs["mbw"]["alpha"] in (tmp_path / "best.txt").read_text()

    from optimizer.merge import Merger
    from optimizer.study.export import load_recipe_document, replay_recipe
    from optimizer.study.runner import StudyRunner
    from optimizer.study.space import suggest_recipe as suggest
    from optimizer.study.storage import StudyFolder

    parents, recipe = replay_recipe(load_recipe_document(tmp_path / "best.yaml"))
    replayed = Merger(parents.bank)
    replayed.merge(recipe)
    trial_runner = StudyRunner(load_study_config(out / "study.yaml"), folder=StudyFolder(tmp_path / "replay"))
    trial_runner.technique.merger.merge(suggest(optuna.trial.FixedTrial(best.params), trial_runner.space))
    assert torch.equal(replayed.output, trial_runner.technique.merger.output)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "best.safetensors"))
    views = trial_runner.technique.merger.state_dict()
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.equal(saved[k], views[k].half() if views[k].is_floating_point() else views[k]) for k in views)

    # the exported recipe refuses a parent that changed
    doc["parents"][1]["sha256"] = "0" * 64
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    from optimizer.study.export import ExportError

    with pytest.raises(ExportError, match="parent 1 .* has sha256"):
        replay_recipe(load_recipe_document(tmp_path / "bad.yaml"))
    result = runner.invoke(app, ["export", str(out), "--format", "recipe", "-o", str(tmp_path / "best.yaml")])
    assert result.exit_code == 2 and "exists" in result.output


@needs_zoo
def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path: Path, monkeypatch) -> None:
    from optimizer.render.renderer import NonFiniteImages
    from optimizer.study.loop import StudyFailed, run_study
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    config = load_study_config(write_zoo_study(tmp_path, budget={"trials": 3}, calibration={"gate": False}))  # the renderer below fails on purpose
    folder = StudyFolder(tmp_path / "run")
    study_runner = StudyRunner(config, folder=folder)
    real_batches = study_runner.renderer.batches
    calls = {"n": 0}

    def sometimes_nan(jobs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise NonFiniteImages("1 of 3 images have NaN/inf pixels: 'x' (seed 0)")
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_batches(jobs)

    monkeypatch.setattr(study_runner.renderer, "batches", sometimes_nan)
    study = run_study(config, folder=folder, runner=study_runner, progress=False)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 2
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert "NonFiniteImages" in failed[0].user_attrs["failure"] and "NaN" in failed[0].user_attrs["failure"]
    assert "OutOfMemoryError" in failed[1].user_attrs["failure"]

    # a broken set-up stops the study with the reason instead of burning the budget; a bug (a bare
    # ValueError, KeyError, ...) stops it at once with its traceback: one failed trial, not five
    # trials recorded as "failed" while the bug goes unseen
    for name, error, expected, match, failed_trials in (
        ("broken", NonFiniteImages("all black"), StudyFailed, "5 trials in a row failed; the last: NonFiniteImages: all black", 5),
        ("buggy", ValueError("a programming error"), ValueError, "a programming error", 1),
    ):
        def fail(jobs, _error=error):
            raise _error

        monkeypatch.setattr(study_runner.renderer, "batches", fail)
        config = config.model_copy(update={"name": name})
        with pytest.raises(expected, match=match):
            run_study(config, folder=folder, runner=study_runner, progress=False)
        stopped = optuna.load_study(study_name=name, storage=folder.storage_url(config))
        assert [t.state.name for t in stopped.trials] == ["FAIL"] * failed_trials


@needs_zoo
def test_pareto_study_exports_the_best_trial_on_held_out_prompts(tmp_path: Path) -> None:
    from torchvision.utils import save_image

    from optimizer.zoo import domain

    reference = tmp_path / "reference"
    reference.mkdir()
    items = domain.samples(images="test", captions="held_out", count=24, seed=3)
    for i, image in enumerate(domain.render([s.index for s in items], [s.attributes for s in items])):
        save_image(image, str(reference / f"{i:03d}.png"))
    study_file = write_zoo_study(
        tmp_path, name="pareto", mode="pareto", objectives=["clip", "fid"], sampler={"name": "nsga2", "seed": 0},
        scorers={**ZOO_CLIP, "reference": str(reference), "features": "clip"}, budget={"trials": 3},
    )
    out = tmp_path / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{out / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and study.metric_names == ["clip", "fid"]
    result = runner.invoke(app, ["export", str(out), "--format", "recipe", "-o", str(tmp_path / "best.yaml")])
    assert result.exit_code == 0, result.output
    held = optuna.load_study(study_name="pareto", storage=f"sqlite:///{out / 'study.db'}").user_attrs["held_out"]
    assert set(held) == {str(t.number) for t in study.best_trials}
    doc = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert doc["held_out"] == held[str(doc["trial"])]
    assert doc["held_out"]["score"] == max(v["score"] for v in held.values())


@needs_zoo
def test_a_rerun_with_a_changed_study_file_is_refused(tmp_path: Path) -> None:
    study_file = write_zoo_study(tmp_path, budget={"trials": 1})
    out = tmp_path / "run"
    assert runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress"]).exit_code == 0
    write_zoo_study(tmp_path, budget={"trials": 1}, sampler={"name": "tpe"})
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress"])
    assert result.exit_code == 2 and "holds study 'test-study'" in result.output and "different study file" in result.output


def test_the_trials_table_shows_no_partial_score_as_a_score() -> None:
    """A pruned trial's value is Optuna's copy of its running score over part of the prompts: the
    table leaves its score empty and says where it was pruned and at what running score."""
    from optuna.distributions import FloatDistribution

    from optimizer.study.report import trials_table

    study = optuna.create_study(direction="maximize")
    dist = {"alpha": FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"alpha": 0.2}, distributions=dist, value=0.5, user_attrs={"values": {"clip": 0.5}}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={"alpha": 0.9}, distributions=dist,
                                              intermediate_values={3: 0.91}))
    table = trials_table(study).set_index("trial")
    assert table.loc[0, "score"] == 0.5 and (table.loc[1, "score"] is None or table.loc[1, "score"] != table.loc[1, "score"])
    assert table.loc[1, "note"] == "pruned at 3 images (running score 0.91 over those images)"


@needs_zoo
def test_an_fp16_study_renders_from_the_half_precision_buffer_and_exports_it_exactly(tmp_path: Path) -> None:
    """``dtype: fp16`` (the GPU default), here on CPU: the bank, the merge buffer and the bound
    pipeline's UNet are half precision, trials score finite values, and the exported checkpoint
    holds exactly the fp16 weights the trial rendered from."""
    from safetensors.torch import load_file

    from optimizer.study.export import export_trial
    from optimizer.study.loop import run_study
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    config = load_study_config(write_zoo_study(tmp_path, name="half", dtype="fp16", budget={"trials": 2}))
    folder = StudyFolder(tmp_path / "run")
    study_runner = StudyRunner(config, folder=folder)
    unet = study_runner.renderer.pipe.unet
    assert study_runner.parents.bank.dtype == torch.float16 and unet.dtype == torch.float16
    study = run_study(config, folder=folder, runner=study_runner, progress=False)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2 and all(torch.isfinite(torch.tensor(t.value)) for t in complete)

    output = study_runner.technique.merger.output
    low, high = output.data_ptr(), output.data_ptr() + output.numel() * output.element_size()
    assert all(low <= p.data_ptr() < high for p in unet.parameters())  # views of the merge buffer, not copies

    best = study.best_trial
    path = export_trial(study=study, config=config, trial=best, output_format="safetensors",
                        output=tmp_path / "half.safetensors", parents=study_runner.parents)
    saved = load_file(str(path))
    study_runner.technique.merger.merge(suggest_recipe(optuna.trial.FixedTrial(best.params), study_runner.space))
    views = study_runner.technique.merger.state_dict()  # what the best trial rendered from
    assert {v.dtype for v in saved.values()} == {torch.float16}
    assert all(torch.equal(saved[k], views[k]) for k in views)


@needs_zoo
def test_a_study_runs_a_plugin_sampler_named_module_colon_class(tmp_path: Path) -> None:
    """``sampler: {name: "tests.plugin_sampler:CentreFirstSampler", options: ...}``: the user's class
    proposes the trials (its first is the centre of every range), with the study's options."""
    file = write_zoo_study(tmp_path, budget={"trials": 2}, calibration={"gate": False},
                        sampler={"name": "tests.plugin_sampler:CentreFirstSampler", "seed": 2, "options": {"spread": 0.1}})
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "run", str(file), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="test-study", storage=f"sqlite:///{out / 'study.db'}")
    first, second = sorted(study.trials, key=lambda t: t.number)
    assert first.params and all(v == 0.5 for v in first.params.values())
    assert all(0.45 <= v <= 0.55 for v in second.params.values()) and second.params != first.params


@needs_zoo
def test_a_cpu_study_exports_in_its_parents_dtype_unless_the_study_file_names_one(tmp_path: Path) -> None:
    """fp16 zoo parents on CPU: computed in fp32, exported (and replayed) in fp16, the size of a
    parent; ``dtype: fp32`` in the study file exports fp32."""
    from safetensors.torch import load_file

    sizes = {}
    for dtype in (None, "fp32"):
        extra = {} if dtype is None else {"dtype": dtype}
        name = f"cpu-{dtype or 'default'}"
        (tmp_path / name).mkdir()
        file = write_zoo_study(tmp_path / name, name=name, budget={"trials": 1}, calibration={"gate": False}, **extra)
        out = tmp_path / name / "out"
        assert runner.invoke(app, ["study", "run", str(file), "--out", str(out), "--no-progress"]).exit_code == 0
        target = tmp_path / f"{name}.safetensors"
        result = runner.invoke(app, ["export", str(out), "--format", "safetensors", "-o", str(target)])
        assert result.exit_code == 0, result.output
        assert runner.invoke(app, ["export", str(out), "--format", "recipe", "-o", str(tmp_path / f"{name}.yaml")]).exit_code == 0
        replayed = tmp_path / f"{name}-replayed.safetensors"
        assert runner.invoke(app, ["replay", str(tmp_path / f"{name}.yaml"), "-o", str(replayed)]).exit_code == 0
        assert replayed.read_bytes() == target.read_bytes()
        floats = {v.dtype for v in load_file(str(target)).values() if v.is_floating_point()}
        assert floats == ({torch.float16} if dtype is None else {torch.float32}), (dtype, floats)
        sizes[dtype] = target.stat().st_size
    parent = Path(load_study_config(tmp_path / "cpu-default" / "study.yaml").parents[0]).stat().st_size
    assert abs(sizes[None] - parent) < 0.05 * parent and sizes["fp32"] > 1.8 * sizes[None]


@needs_zoo
def test_a_study_folder_moved_without_its_parents_exports_its_recipe_and_finds_moved_parents(tmp_path: Path) -> None:
    """recipe, mbw and the ComfyUI workflow come from the study alone; weight exports name the missing parent, and
    ``--parents DIR`` finds moved parents by name with their sha256 checked."""
    import shutil

    from safetensors.torch import load_file

    data = zoo_study_data(tmp_path, budget={"trials": 1}, calibration={"gate": False}, config_dir=str(ZOO / "config"))
    for i, parent in enumerate(data["parents"]):
        data["parents"][i] = str(shutil.copy(parent, tmp_path / f"parent{i}.safetensors"))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert runner.invoke(app, ["study", "run", str(tmp_path / "study.yaml"), "--out", str(out), "--no-progress"]).exit_code == 0
    before = {fmt: tmp_path / f"before.{fmt}" for fmt in ("recipe", "mbw", "comfyui", "safetensors")}
    for fmt, path in before.items():
        assert runner.invoke(app, ["export", str(out), "--format", fmt, "-o", str(path)]).exit_code == 0

    laptop = tmp_path / "laptop"
    shutil.copytree(out, laptop / "study")
    (laptop / "weights").mkdir()
    for i in range(2):
        (tmp_path / f"parent{i}.safetensors").rename(laptop / "weights" / f"parent{i}.safetensors")
    for fmt in ("recipe", "mbw", "comfyui"):
        result = runner.invoke(app, ["export", str(laptop / "study"), "--format", fmt, "-o", str(laptop / f"after.{fmt}")])
        assert result.exit_code == 0, result.output
        assert (laptop / f"after.{fmt}").read_bytes() == before[fmt].read_bytes()
    result = runner.invoke(app, ["export", str(laptop / "study"), "--format", "mecha", "-o", str(laptop / "zoo.mecha")])
    assert result.exit_code == 2 and "sd-mecha opens the parents it names" in result.output, result.output
    result = runner.invoke(app, ["export", str(laptop / "study"), "--format", "mecha", "--parents", str(laptop / "weights"), "-o", str(laptop / "zoo.mecha")])
    assert result.exit_code == 2 and "lacks" in result.output and "sd-mecha's sd1-ldm config" in result.output, result.output  # zoo models are not SD1-sized
    cases = [([], "parent 0: " + str(tmp_path / "parent0.safetensors") + " (sha256 "),
             (["--parents", str(laptop)], f"parent 0: {laptop} holds no parent0.safetensors")]
    for extra, needle in cases:
        result = runner.invoke(app, ["export", str(laptop / "study"), "--format", "safetensors", *extra, "-o", str(laptop / "x.safetensors")])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert sorted(p.name for p in laptop.iterdir()) == ["after.comfyui", "after.mbw", "after.recipe", "study", "weights"]  # nothing half-written
    result = runner.invoke(app, ["export", str(laptop / "study"), "--format", "safetensors", "--parents", str(laptop / "weights"),
                                 "-o", str(laptop / "x.safetensors")])
    assert result.exit_code == 0, result.output
    got, want = load_file(str(laptop / "x.safetensors")), load_file(str(before["safetensors"]))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    swapped = laptop / "swapped"
    swapped.mkdir()
    shutil.copy(laptop / "weights" / "parent1.safetensors", swapped / "parent0.safetensors")
    shutil.copy(laptop / "weights" / "parent1.safetensors", swapped / "parent1.safetensors")
    result = runner.invoke(app, ["export", str(laptop / "study"), "--format", "safetensors", "--parents", str(swapped), "-o", str(laptop / "y.safetensors")])
    assert result.exit_code == 2 and "the study was run with" in result.output and not (laptop / "y.safetensors").exists(), result.output

    # evomerge replay: the recipe alone (parents found by name) gives the exported bytes
    result = runner.invoke(app, ["replay", str(laptop / "after.recipe"), "-o", str(laptop / "replayed.safetensors")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "parent 0: " in result.output and "--parents DIR" in result.output
    result = runner.invoke(app, ["replay", str(laptop / "after.recipe"), "--parents", str(swapped), "-o", str(laptop / "replayed.safetensors")])
    assert result.exit_code == 2 and "the recipe was made with" in result.output and not (laptop / "replayed.safetensors").exists()
    result = runner.invoke(app, ["replay", str(laptop / "after.recipe"), "--parents", str(laptop / "weights"), "-o", str(laptop / "replayed.safetensors")])
    assert result.exit_code == 0, result.output
    assert (laptop / "replayed.safetensors").read_bytes() == before["safetensors"].read_bytes()
    (laptop / "bad.yaml").write_text("evomerge_recipe: 1\nparents: []\n")
    result = runner.invoke(app, ["replay", str(laptop / "bad.yaml"), "-o", str(laptop / "z.safetensors")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and "not an evomerge recipe document" in result.output
