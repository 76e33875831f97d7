"""evomerge render / compare: checkpoints and recipes on a prompt set, with the study's seeded renderer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.zoo import paths
from optimizer.zoo.prompts import zoo_prompt_set_data

ZOO = paths.default_zoo_dir()
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from optimizer.architectures.layout import load_layout
    from optimizer.checkpoint.load import load_checkpoint

    if not (ZOO / paths.MANIFEST).is_file():
        pytest.skip("studies/zoo is not built")
    root = tmp_path_factory.mktemp("render")
    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:2], held_out=prompts["held_out"][:3], steps=4)
    (root / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    shape, colour = paths.model_file(ZOO, "shape"), paths.model_file(ZOO, "colour")
    blocks = load_layout("sd1").blocks
    doc = {"evomerge_recipe": 1, "study": "hand-written", "trial": 0, "architecture": "sd1", "dtype": "float32",
           "parents": [{"path": str(p), "sha256": load_checkpoint(p).sha256} for p in (shape, colour)],
           "recipe": {"method": "weighted_sum", "params": {"alpha": dict.fromkeys(blocks, 0.0)}, "seed": 0, "merge_vae": False}}
    (root / "alpha0.yaml").write_text(yaml.safe_dump(doc))
    return {"root": root, "prompts": root / "prompts.yaml", "shape": shape, "colour": colour, "recipe": root / "alpha0.yaml"}


def _pngs(folder: Path) -> list[np.ndarray]:
    index = json.loads((folder / "render.json").read_text())
    return [np.asarray(Image.open(folder / item["file"])) for item in index["images"]]


def test_render_writes_one_image_per_job_and_a_recipe_at_alpha_0_renders_its_first_parent(inputs: dict[str, Path]) -> None:
    root = inputs["root"]
    for name in ("shape", "recipe"):
        result = runner.invoke(app, ["render", str(inputs[name]), "--prompts", str(inputs["prompts"]), "-o", str(root / f"r-{name}")])
        assert result.exit_code == 0, result.output
    index = json.loads((root / "r-shape" / "render.json").read_text())
    assert [(i["file"], i["seed"]) for i in index["images"]][:1] == [("000.png", index["images"][0]["seed"])]
    assert len(index["images"]) == 3 * len(zoo_prompt_set_data()["seeds"]) and (root / "r-shape" / "grid.png").is_file()
    shape, recipe = _pngs(root / "r-shape"), _pngs(root / "r-recipe")
    assert all(np.array_equal(a, b) for a, b in zip(shape, recipe, strict=True))  # alpha 0 is the first parent, bit for bit
    assert not all(np.array_equal(a, shape[0]) for a in shape[1:])
    result = runner.invoke(app, ["render", str(inputs["shape"]), "--prompts", str(inputs["prompts"]), "-o", str(root / "r-shape")])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert runner.invoke(app, ["render", str(inputs["shape"]), "--prompts", str(inputs["prompts"]), "-o", str(root / "r-shape"),
                               "--split", "search", "--overwrite"]).exit_code == 0
    assert len(json.loads((root / "r-shape" / "render.json").read_text())["images"]) == 2 * len(zoo_prompt_set_data()["seeds"])


def test_compare_lays_candidates_out_as_rows_on_the_same_jobs(inputs: dict[str, Path]) -> None:
    root = inputs["root"]
    out = root / "cmp.png"
    result = runner.invoke(app, ["compare", str(inputs["shape"]), str(inputs["colour"]), str(inputs["recipe"]), "--prompts", str(inputs["prompts"]),
                                 "--label", "shape", "--label", "colour", "--label", "alpha 0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert [r["label"] for r in sidecar["rows"]] == ["shape", "colour", "alpha 0"]
    columns = len(sidecar["columns"])
    grid = np.asarray(Image.open(out))
    height, width = grid.shape[:2]
    size = zoo_prompt_set_data()["height"]
    assert width == 2 + columns * (size + 2) and height == 2 + 3 * (size + 12 + 2)  # 3 rows of labelled tiles
    row = lambda r: grid[2 + r * (size + 14): 2 + r * (size + 14) + size]  # noqa: E731
    assert np.array_equal(row(0), row(2)) and not np.array_equal(row(0), row(1))  # alpha 0 renders the first parent


@pytest.mark.parametrize(("args", "needle"), [
    (["compare", "{shape}", "{root}/nope.safetensors", "-o", "{root}/g.png"], "no checkpoint or recipe at"),
    (["compare", "{shape}", "-o", "{root}/g.png"], "at least two candidates"),
    (["compare", "{shape}", "{colour}", "-o", "{root}/g.jpg"], "is a PNG file"),
    (["compare", "{shape}", "{colour}", "--label", "x", "-o", "{root}/g.png"], "1 labels for 2 candidates"),
    (["render", "{root}/nope.yaml", "-o", "{root}/r-nope"], "no checkpoint or recipe at"),
    (["render", "{shape}", "--split", "train", "-o", "{root}/r-nope"], "--split 'train'"),
])
def test_bad_input_is_one_line_and_writes_nothing(inputs: dict[str, Path], args: list[str], needle: str) -> None:
    root = inputs["root"]
    before = sorted(p.name for p in root.iterdir())
    argv = [a.format(**{k: str(v) for k, v in inputs.items()}) for a in args] + ["--prompts", str(inputs["prompts"])]
    result = runner.invoke(app, argv)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.output
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.parametrize("architecture", ["sdxl", "sd3", "flux-schnell"])
def test_compare_renders_tiny_checkpoints_of_other_architectures(architecture: str, tmp_path: Path) -> None:
    from optimizer.testing.tiny_dit import tiny_dit_components, tiny_dit_config_dir, write_tiny_dit_single_file
    from optimizer.testing.tiny_models import tiny_config_dir, tiny_sdxl_components, write_tiny_ldm

    if architecture == "sdxl":
        models = [tiny_sdxl_components(s) for s in (0, 1)]
        files = [write_tiny_ldm(tmp_path / f"{i}.safetensors", m, "sdxl") for i, m in enumerate(models)]
        config = tiny_config_dir(models[0], "sdxl")
    else:
        models = [tiny_dit_components(architecture, seed=s) for s in (0, 1)]
        files = [write_tiny_dit_single_file(tmp_path / f"{i}.safetensors", m, architecture) for i, m in enumerate(models)]
        config = tiny_dit_config_dir(models[0], architecture)
    prompts = zoo_prompt_set_data()
    prompts.update(search=prompts["search"][:1], held_out=prompts["held_out"][:1], seeds=[0], steps=2, width=32, height=32, scheduler=None)
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(prompts))
    out = tmp_path / "cmp.png"
    result = runner.invoke(app, ["compare", *map(str, files), "--prompts", str(tmp_path / "prompts.yaml"), "--config", str(config), "-o", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (2 + 2 * (32 + 14), 2 + 34)
    assert not np.array_equal(grid[2:34], grid[48:80])  # two different models, one prompt and seed
