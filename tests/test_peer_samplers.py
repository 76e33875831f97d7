"""The peers' strategies as samplers (issue 14): auto-MBW's coordinate search, bayesian-merger's
GP-UCB (against bayes_opt itself), supermerger's preset grid and the Checkpoint Merger sweep.
Each keeps its schedule, reads the study's bound space, survives a resume, and runs a real study."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from optimizer.architectures.layout import load_layout
from optimizer.study.config import ParamSpace, SamplerConfig, StudyConfigError, parse_study_config
from optimizer.study.peer_samplers import (
    CoordinateSampler,
    GPUCBSampler,
    PresetGridSampler,
    preset_block_values,
    supermerger_presets,
)
from optimizer.study.samplers import make_sampler
from optimizer.study.space import bind_space, suggest_recipe
from tests.zoo_study import needs_zoo, zoo_study_data

optuna.logging.set_verbosity(optuna.logging.WARNING)
SD1 = load_layout("sd1")
GRID = [i / 10 for i in range(11)]


def _bowl(trial: optuna.Trial) -> float:
    """A separable bowl with its minimum at (0.3, 0.7, 0.2) on the 0.1 grid."""
    x, y, z = (trial.suggest_float(n, 0.0, 1.0) for n in ("a", "b", "c"))
    return (x - 0.3) ** 2 + 2 * (y - 0.7) ** 2 + 3 * (z - 0.2) ** 2


def _per_block_space(**spec):
    return bind_space({"alpha": ParamSpace(**spec)}, layout=SD1, method="weighted_sum", n_parents=2)


# ------------------------------------------------------------------------------------ coordinate
def test_coordinate_sweeps_one_dimension_at_a_time_and_keeps_the_best() -> None:
    study = optuna.create_study(sampler=CoordinateSampler())
    study.optimize(_bowl, n_trials=1 + 3 * 11)
    params = [t.params for t in study.trials]
    assert params[0] == {"a": 0.5, "b": 0.5, "c": 0.5}  # the start point
    assert [p["a"] for p in params[1:12]] == pytest.approx(GRID)  # a swept, b and c held
    assert all(p["b"] == 0.5 and p["c"] == 0.5 for p in params[1:12])
    assert all(p["a"] == pytest.approx(0.3) for p in params[12:])  # the best a kept while b is swept
    assert [p["b"] for p in params[12:23]] == pytest.approx(GRID)
    assert study.best_params == pytest.approx({"a": 0.3, "b": 0.7, "c": 0.2})  # one pass finds a separable optimum


def test_coordinate_follows_the_space_in_block_order_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    space = _per_block_space()
    names = [d.name for d in space.dimensions]
    assert names[:3] == ["alpha.BASE", "alpha.IN00", "alpha.IN01"] and names[13] == "alpha.M00"

    def objective(trial: optuna.Trial) -> float:
        recipe = suggest_recipe(trial, space)
        return -sum((v - 0.3) ** 2 for v in recipe.params["alpha"].values())

    storage = f"sqlite:///{tmp_path / 's.db'}"
    first = optuna.create_study(study_name="c", storage=storage, direction="maximize", sampler=CoordinateSampler(steps=5, space=space))
    first.optimize(objective, n_trials=7)
    again = optuna.load_study(study_name="c", storage=storage, sampler=CoordinateSampler(steps=5, space=space))  # a new process
    again.optimize(objective, n_trials=7)
    whole = optuna.create_study(direction="maximize", sampler=CoordinateSampler(steps=5, space=space))
    whole.optimize(objective, n_trials=14)
    assert [t.params for t in again.trials] == [t.params for t in whole.trials]
    assert [t.params["alpha.BASE"] for t in whole.trials[1:6]] == [0.0, 0.25, 0.5, 0.75, 1.0]  # BASE first, 5 steps
    assert all(v == 0.5 for t in whole.trials[1:6] for n, v in t.params.items() if n != "alpha.BASE")
    assert whole.trials[6].params["alpha.BASE"] == 0.25 and whole.trials[6].params["alpha.IN00"] == 0.0  # then IN00, BASE at its best


def test_the_peer_options_are_checked() -> None:
    with pytest.raises(StudyConfigError, match="coordinate: steps must be at least 2"):
        make_sampler(SamplerConfig(name="coordinate", options={"steps": 1}))
    with pytest.raises(StudyConfigError, match="unknown preset"):
        make_sampler(SamplerConfig(name="preset-grid", options={"presets": ["GRAD_Q"]}))
    with pytest.raises(StudyConfigError, match="sampler.options.space: the search space is the study's"):
        make_sampler(SamplerConfig(name="coordinate", options={"space": 1}))
    with pytest.raises(StudyConfigError, match="presets are defined for 26-block SD1/SD2 and SDXL"):
        make_sampler(SamplerConfig(name="preset-grid"),
                     space=bind_space({"alpha": ParamSpace()}, layout=load_layout("flux"), method="weighted_sum", n_parents=2))


# ------------------------------------------------------------------------------------ presets
def test_the_preset_file_is_supermergers_table() -> None:
    presets = supermerger_presets()
    assert len(presets) == 38 and list(presets)[:3] == ["GRAD_V", "GRAD_A", "FLAT_25"] and list(presets)[-1] == "ALL_B"
    assert presets["ALL_A"] == (0.0,) * 26 and presets["ALL_B"] == (1.0,) * 26
    assert presets["FLAT_25"] == (0.0,) + (0.25,) * 25  # supermerger's presets leave BASE at 0
    grad_v = presets["GRAD_V"]
    assert grad_v[1] == 1 and grad_v[13] == 0 and grad_v[25] == 1 and grad_v[1:14] == tuple(reversed(grad_v[13:26]))


def test_preset_grid_proposes_each_preset_as_its_block_values() -> None:
    space = _per_block_space()
    study = optuna.create_study(direction="maximize", sampler=PresetGridSampler(space=space))
    study.optimize(lambda t: sum(suggest_recipe(t, space).params["alpha"].values()), n_trials=40)
    names = list(supermerger_presets())
    for trial in study.trials:
        expected = preset_block_values(names[trial.number % len(names)], layout=SD1)
        got = suggest_recipe(optuna.trial.FixedTrial(trial.params), space).params["alpha"]
        assert got == pytest.approx(expected)
    assert study.best_trial.number == names.index("ALL_B")


def test_presets_map_to_sdxl_as_supermerger_does_and_groups_take_the_mean() -> None:
    values = supermerger_presets()["GRAD_V"]
    sdxl = preset_block_values("GRAD_V", layout=load_layout("sdxl"))
    unet = list(values[1:])
    assert list(sdxl.values()) == [values[0], *unet[:9], *unet[12:22]]  # w[:9] + w[12:22] of the 25 UNet values
    space = _per_block_space(groups={"IN": [f"IN{i:02d}" for i in range(12)]})
    study = optuna.create_study(sampler=PresetGridSampler(presets=["GRAD_V"], space=space))
    trial = study.ask()
    recipe = suggest_recipe(trial, space)
    assert recipe.params["alpha"]["IN05"] == pytest.approx(sum(values[1:13]) / 12)
    assert recipe.params["alpha"]["OUT03"] == pytest.approx(values[17])


# ------------------------------------------------------------------------------------ GP-UCB
def test_gp_ucb_proposes_what_bayes_opt_suggests_from_the_same_trials() -> None:
    """After its random start, a trial is bayes_opt's own ``suggest()`` given every complete trial
    (a minimised value negated: bayes_opt maximises)."""
    from bayes_opt import BayesianOptimization
    from bayes_opt.acquisition import UpperConfidenceBound

    study = optuna.create_study(sampler=GPUCBSampler(init_points=4, seed=7))
    study.optimize(_bowl, n_trials=4)
    trial = study.ask()
    proposed = {n: trial.suggest_float(n, 0.0, 1.0) for n in ("a", "b", "c")}
    state = 7 + trial.number
    reference = BayesianOptimization(f=None, pbounds={n: (0.0, 1.0) for n in "abc"}, random_state=state, verbose=0,
                                     acquisition_function=UpperConfidenceBound(kappa=2.576, random_state=state), allow_duplicate_points=True)
    for t in study.trials[:4]:
        reference.register(params=t.params, target=-t.value)
    assert proposed == pytest.approx(reference.suggest())


def test_gp_ucb_beats_its_own_random_start_on_a_smooth_bowl() -> None:
    study = optuna.create_study(sampler=GPUCBSampler(init_points=5, seed=0))
    study.optimize(_bowl, n_trials=25)
    start = min(t.value for t in study.trials[:5])
    assert study.best_value < start / 3


# ------------------------------------------------------------------------------------ a real study
@needs_zoo
@pytest.mark.parametrize("name", ["coordinate", "preset-grid", "uniform-sweep", "gp-ucb"])
def test_a_zoo_study_runs_each_peer_strategy(name: str, tmp_path: Path) -> None:
    from optimizer.study.loop import run_study
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder

    options = {"init_points": 2} if name == "gp-ucb" else {"steps": 3} if name in ("coordinate", "uniform-sweep") else {}
    data = zoo_study_data(tmp_path, name=f"peer-{name}", search_space={"alpha": {}}, sampler={"name": name, "seed": 1, "options": options},
                          budget={"trials": 4}, render={"batch_size": 6, "grid_images": 0})
    config = parse_study_config(data, source="test", base=tmp_path)
    folder = StudyFolder(tmp_path / "run")
    runner = StudyRunner(config, folder=folder)
    study = run_study(config, folder=folder, runner=runner, progress=False)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 4
    recipes = [suggest_recipe(optuna.trial.FixedTrial(t.params), runner.space).params["alpha"] for t in study.trials]
    if name == "coordinate":
        first, second = (d.blocks[0] for d in runner.space.dimensions[:2])  # the first searched blocks, in layout order
        assert set(recipes[0].values()) == {0.5} and [r[first] for r in recipes[1:4]] == [0.0, 0.5, 1.0]
        assert all(r[second] == 0.5 for r in recipes)
    elif name == "preset-grid":
        searched = [d.blocks[0] for d in runner.space.dimensions]  # pinned blocks (equal in both parents) keep their constant
        expected = preset_block_values("GRAD_V", layout=runner.space.layout)
        assert [recipes[0][b] for b in searched] == pytest.approx([expected[b] for b in searched])
    elif name == "uniform-sweep":
        searched = [d.blocks[0] for d in runner.space.dimensions]
        assert [{r[b] for b in searched} for r in recipes] == [{0.0}, {0.5}, {1.0}, {0.0}]
    else:
        assert len({tuple(r.values()) for r in recipes}) == 4
