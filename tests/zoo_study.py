"""A small study of the embedded zoo, shared by the study tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from optimizer.zoo import paths
from optimizer.zoo.prompts import zoo_prompt_set_data
from tests.zoo_clip import ZOO_CLIP

ZOO = paths.default_zoo_dir()


def zoo_study_data(tmp: Path, **overrides) -> dict:
    """A three-trial random-sampler study of the zoo's shape and colour models (IN/OUT alpha groups,
    zoo CLIP), its six-search/four-held-out prompt set written to ``tmp``; ``overrides`` replace fields."""
    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:6], held_out=prompts["held_out"][:4], steps=6)
    (tmp / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    data = {
        "name": "test-study",
        "parents": [str(paths.model_file(ZOO, "shape")), str(paths.model_file(ZOO, "colour"))],
        "search_space": {"alpha": {"groups": {"IN": [f"IN{i:02d}" for i in range(12)], "OUT": [f"OUT{i:02d}" for i in range(12)]}}},
        "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "none"},
        "objectives": ["clip"],
        "scorers": dict(ZOO_CLIP),
        "prompts": "prompts.yaml",
        "render": {"batch_size": 3, "grid_images": 4},
        "budget": {"trials": 3},
    }
    data.update(overrides)
    return data


def write_zoo_study(tmp: Path, **overrides) -> Path:
    """:func:`zoo_study_data` written as ``tmp/study.yaml``."""
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(zoo_study_data(tmp, **overrides)))
    return path


#: skip a test that needs the embedded zoo's models when ``studies/zoo`` is not built
needs_zoo = pytest.mark.skipif(not (ZOO / paths.MANIFEST).is_file(), reason="studies/zoo is not built")
