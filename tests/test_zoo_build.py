"""The zoo: a smoke build -> check round trip, and the committed zoo's files and figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from optimizer.architectures import load_layout
from optimizer.checkpoint.load import load_checkpoint
from optimizer.zoo import paths
from optimizer.zoo.build import ZooError, build_zoo, check_zoo, load_zoo_pipeline, measure_zoo

ZOO = paths.default_zoo_dir()
needs_zoo = pytest.mark.skipif(not (ZOO / paths.MANIFEST).is_file(), reason="studies/zoo is not built (evomerge zoo build)")


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole zoo built with a few steps per model: tests the build machinery, not the models."""
    return build_zoo(out=tmp_path_factory.mktemp("zoo") / "zoo", scale=0.002, evaluation_count=4, progress=False)


def test_smoke_build_writes_every_artifact_and_check_reproduces_it(smoke_zoo: Path) -> None:
    manifest = json.loads((smoke_zoo / paths.MANIFEST).read_text())
    for name in manifest["models"]:
        assert paths.model_file(smoke_zoo, name).is_file()
        assert (paths.diffusers_dir(smoke_zoo, name) / "model_index.json").is_file()
        assert paths.grid_file(smoke_zoo, name).is_file()
    assert {"real", *manifest["models"]} == set(manifest["quality"])
    assert not list(smoke_zoo.parent.glob(".zoo.building-*"))  # the temporary build folder is gone
    report = check_zoo(zoo=smoke_zoo, measure=True, fid=True, progress=False)  # identical re-measurement
    assert report["hashes"] == "ok" and report["quality"] == manifest["quality"]


def test_check_catches_tampering_and_missing_files(smoke_zoo: Path, tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    shutil.copytree(smoke_zoo, zoo)
    name = json.loads((zoo / paths.MANIFEST).read_text())["models"][0]
    data = bytearray(paths.model_file(zoo, name).read_bytes())
    data[-1] ^= 1
    paths.model_file(zoo, name).write_bytes(bytes(data))
    with pytest.raises(ZooError, match=f"sha256 mismatch for models/{name}.safetensors"):
        check_zoo(zoo=zoo, measure=False)
    paths.model_file(zoo, name).unlink()
    with pytest.raises(ZooError, match=f"missing models/{name}.safetensors"):
        check_zoo(zoo=zoo, measure=False)
    shutil.rmtree(paths.diffusers_dir(zoo, name).parent)  # derived folders may be absent
    shutil.copy(paths.model_file(smoke_zoo, name), paths.model_file(zoo, name))
    assert check_zoo(zoo=zoo, measure=False)["diffusers_folders"] is False
    with pytest.raises(ZooError, match="no manifest.json"):
        check_zoo(zoo=tmp_path / "nowhere", measure=False)


@needs_zoo
def test_committed_zoo_files_match_the_manifest() -> None:
    report = check_zoo(zoo=ZOO, measure=False)
    assert report["hashes"] == "ok"


@needs_zoo
def test_committed_models_have_the_sd1_layout_and_load_with_from_single_file() -> None:
    manifest = json.loads((ZOO / paths.MANIFEST).read_text())
    layout = load_layout("sd1")
    for name in manifest["models"]:
        ckpt = load_checkpoint(paths.model_file(ZOO, name))
        assert ckpt.architecture == "sd1"
        owners = set(layout.assign(ckpt.state_dict).owner.values())
        assert owners == {*layout.blocks, "VAE"}  # every one of the 26 blocks has weights
        assert {t.dtype for t in ckpt.state_dict.values()} == {torch.float16}
    pipe = load_zoo_pipeline(manifest["models"][0], zoo=ZOO)
    assert pipe.unet.dtype == torch.float32


@needs_zoo
def test_specialists_beat_the_base_at_their_speciality_and_lose_elsewhere() -> None:
    quality = json.loads((ZOO / paths.MANIFEST).read_text())["quality"]
    base = quality["base"]
    assert quality["shape"]["oracle_digit"] > base["oracle_digit"]
    colour = (quality["colour"]["oracle_fg"] + quality["colour"]["oracle_bg"]) / 2
    assert colour > (base["oracle_fg"] + base["oracle_bg"]) / 2
    style = (quality["style"]["oracle_thickness"] + quality["style"]["oracle_slant"]) / 2
    assert style > (base["oracle_thickness"] + base["oracle_slant"]) / 2
    assert quality["shape"]["oracle_fg"] < base["oracle_fg"]  # the shape specialist forgets colour
    assert quality["colour"]["oracle_digit"] < base["oracle_digit"]  # the colour specialist forgets shape


@needs_zoo
def test_committed_quality_figures_reproduce_without_fid() -> None:
    manifest = json.loads((ZOO / paths.MANIFEST).read_text())
    measured = measure_zoo(ZOO, names=manifest["models"], settings=manifest["evaluation"], fid=False, progress=False)
    for name, figures in measured.items():
        for key, value in figures.items():
            assert value == pytest.approx(manifest["quality"][name][key], abs=0.02 if key.startswith("oracle") else 0.5), (name, key)
