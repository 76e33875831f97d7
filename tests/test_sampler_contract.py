"""Every registered sampler, and a plug-in ``module:Class``, through the same checks (in the spirit of
Optuna's own ``SamplerTestCase``): it builds from a study file's settings, the same seed proposes
the same parameters, proposals stay in their ranges, multi-objective support is what the registry
says, and unknown options or names are one clear error."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from optimizer.study.config import SamplerConfig, StudyConfigError
from optimizer.study.sampler_registry import SAMPLERS, sampler_entry
from optimizer.study.samplers import make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)
NAMES = sorted(SAMPLERS) + ["tests.plugin_sampler:CentreFirstSampler"]


def _proposals(config: SamplerConfig, *, trials: int = 6, directions: tuple[str, ...] = ("minimize",)) -> list[dict]:
    study = optuna.create_study(sampler=make_sampler(config), directions=list(directions))

    def objective(trial: optuna.Trial):
        x, y = trial.suggest_float("x", 0.0, 1.0), trial.suggest_float("y", -1.0, 1.0)
        values = ((x - 0.3) ** 2 + y**2, (x - 0.8) ** 2)
        return values[: len(directions)] if len(directions) > 1 else values[0]

    study.optimize(objective, n_trials=trials)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", NAMES)
def test_a_sampler_is_reproducible_from_its_seed_and_stays_in_range(name: str) -> None:
    first = _proposals(SamplerConfig(name=name, seed=3))
    assert first == _proposals(SamplerConfig(name=name, seed=3))  # the same seed proposes the same parameters
    assert all(0.0 <= p["x"] <= 1.0 and -1.0 <= p["y"] <= 1.0 for p in first)
    other = _proposals(SamplerConfig(name=name, seed=4))
    if name in SAMPLERS and SAMPLERS[name].deterministic:
        assert first == other  # a fixed schedule (the peer strategies): the seed changes nothing
    else:
        assert first != other  # the seed reaches the sampler


@pytest.mark.parametrize("name", NAMES)
def test_multi_objective_support_is_what_the_registry_says(name: str) -> None:
    from optimizer.study.config import parse_study_config

    data = {"name": "x", "parents": ["a.safetensors", "b.safetensors"], "prompts": "p.yaml", "budget": {"trials": 2},
            "search_space": {"alpha": {"share": "global"}}, "mode": "pareto", "pruner": {"name": "none"},
            "objectives": ["clip", "aesthetic"], "scorers": {"aesthetic_head": "head.pth"}, "sampler": {"name": name}}
    if sampler_entry(name).multi_objective:
        assert len(_proposals(SamplerConfig(name=name, seed=0), trials=4, directions=("minimize", "minimize"))) == 4
    else:
        with pytest.raises(StudyConfigError, match=f"sampler: {name} is single-objective"):
            parse_study_config(data, source="test")


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_names_the_class_and_what_it_takes(name: str) -> None:
    with pytest.raises(StudyConfigError, match=r"sampler.options: \w+ has no option\(s\) \['no_such_option'\]"):
        make_sampler(SamplerConfig(name=name, options={"no_such_option": 1}))


def test_a_plugin_sampler_gets_its_options_and_the_seed() -> None:
    sampler = make_sampler(SamplerConfig(name="tests.plugin_sampler:CentreFirstSampler", seed=5, options={"spread": 0.2}))
    assert sampler.spread == 0.2
    proposals = _proposals(SamplerConfig(name="tests.plugin_sampler:CentreFirstSampler", seed=5, options={"spread": 0.2}))
    assert proposals[0] == {"x": 0.5, "y": 0.0} and all(0.4 <= p["x"] <= 0.6 for p in proposals)


@pytest.mark.parametrize(("name", "needle"), [
    ("bayes", "unknown sampler 'bayes'; known: "),
    ("no_such_module_here:Sampler", "cannot import no_such_module_here"),
    ("tests.plugin_sampler:Missing", "tests.plugin_sampler has no Missing"),
    ("optuna:Study", "optuna:Study is not an Optuna sampler class"),
    (":Sampler", "a plug-in is named module:Class"),
])
def test_a_bad_sampler_name_is_one_line_naming_the_field(name: str, needle: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from optimizer.cli import app

    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({"name": "x", "parents": ["a.safetensors", "b.safetensors"], "prompts": "p.yaml", "budget": {"trials": 2},
                                    "sampler": {"name": name}}))
    result = CliRunner().invoke(app, ["study", "run", str(file), "--out", str(tmp_path / "out"), "--no-progress"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "sampler.name" in lines[0] and needle in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_evomerge_samplers_lists_every_registered_sampler() -> None:
    import json

    from typer.testing import CliRunner

    from optimizer.cli import app

    result = CliRunner().invoke(app, ["samplers", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == list(SAMPLERS)
    assert {r["name"]: r["multi_objective"] for r in rows}["cmaes"] is False
    text = CliRunner().invoke(app, ["samplers"]).output
    assert "tpe (optuna.samplers._tpe.sampler.TPESampler)" in text and "module:Class" in text
