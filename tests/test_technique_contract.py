"""Contract of every registered technique (issue 18): iterate the registry, so a new technique is
tested without editing this file. On tiny SD1 parents each technique must: accept a valid study
file; render parent ``i`` when told to show it; render parent A for the recipe alpha = 0 (the
corner of the search space is the parent, bit for bit); say whether it exports weights and refuse
the formats it cannot write; be what the study file's ``technique:`` names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from optimizer.merge import MergeRecipe
from optimizer.render.prompts import load_prompt_set
from optimizer.render.renderer import Renderer
from optimizer.study.config import StudyConfigError, parse_study_config
from optimizer.study.techniques import TECHNIQUES, Technique, TechniqueError, build_technique, study_parents, technique_class
from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, write_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optimizer.zoo.prompts import zoo_prompt_set_data

    root = tmp_path_factory.mktemp("techniques")
    a = tiny_sd1_components(seed=0)
    write_tiny_ldm(root / "a.safetensors", a, "sd1")
    write_tiny_ldm(root / "b.safetensors", tiny_sd1_components(seed=1), "sd1")
    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:1], held_out=prompts["held_out"][:1], steps=2, width=32, height=32)
    (root / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    (root / "config_path").write_text(str(tiny_config_dir(a, "sd1")))
    return root


def _config(root: Path, technique: str):
    data = {"name": f"t-{technique}", "parents": [str(root / "a.safetensors"), str(root / "b.safetensors")],
            "config_dir": (root / "config_path").read_text(), "technique": technique, "search_space": {"alpha": {"share": "global"}},
            "objectives": ["clip"], "prompts": "prompts.yaml", "budget": {"trials": 1}}
    return parse_study_config(data, base=root)


def _render(technique: Technique, root: Path) -> torch.Tensor:
    prompt_set = load_prompt_set(str(root / "prompts.yaml"))
    return Renderer(technique.pipe, prompt_set=prompt_set, batch_size=1).render(prompt_set.jobs("search")[:1])


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_every_technique_keeps_the_contract(name: str, study_dir: Path) -> None:
    config = _config(study_dir, name)
    cls = technique_class(name)
    assert cls.name == name and issubclass(cls, Technique)
    cls.check_config(config)  # a valid study file passes the technique's own rules
    parents = study_parents(config)
    technique = build_technique(config, parents=parents)
    assert isinstance(technique, cls)

    technique.show_parent(0)
    first = _render(technique, study_dir)
    technique.show_parent(1)
    second = _render(technique, study_dir)
    assert not torch.equal(first, second)  # two different parents render differently
    layout = parents.bank.layout
    seconds = technique.prepare(MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.0))
    assert isinstance(seconds, dict) and all(v >= 0 for v in seconds.values())
    assert torch.equal(_render(technique, study_dir), first)  # alpha = 0 is parent A, bit for bit
    assert technique.evaluations_per_step >= 1

    assert cls.export_refusal("recipe") is None
    assert (cls.export_refusal("safetensors") is None) == cls.exports_weights
    assert str(study_dir) in cls.export_hint(study_dir)
    if cls.exports_weights:
        assert cls.export_state(config=config, parents=parents, recipe=MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.5)) is None
    else:
        with pytest.raises(TechniqueError):
            cls.export_state(config=config, parents=parents, recipe=MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=0.5))


def test_an_unknown_technique_is_named_with_the_known_ones(study_dir: Path) -> None:
    with pytest.raises(StudyConfigError, match=r"technique: .*unknown technique 'blend'; use merge, output_ensemble"):
        _config(study_dir, "blend")
