"""`evomerge import` of sd-mecha recipes, judged by sd-mecha itself: the imported recipe, merged by
evomerge, gives the tensors sd-mecha merges from the original file; exported recipes come back as
they were; what evomerge cannot hold is one line."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optimizer.architectures.layout import load_layout
from optimizer.cli import app
from optimizer.merge import MergeRecipe, merge_state_dicts_reference
from optimizer.study.export import ExportError
from optimizer.study.mecha import mecha_text
from optimizer.study.mecha_import import import_mecha

sd_mecha = pytest.importorskip("sd_mecha")
runner = CliRunner()


def _quiet_bar(*args, **kwargs):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three SD1 files with every key of sd-mecha's sd1-ldm config (small shapes)."""
    from sd_mecha.extensions import model_configs

    root = tmp_path_factory.mktemp("mecha-import")
    keys = [k for k, meta in model_configs.resolve("sd1-ldm").keys().items() if not meta.optional]
    files = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(3, 4, generator=g) for k in keys}
        save_file(sd, str(root / f"p{seed}.safetensors"))
        files.append(str(root / f"p{seed}.safetensors"))
    return {"files": files, "root": root}


def _sd_mecha_merge(path: Path) -> dict[str, torch.Tensor]:
    return sd_mecha.merge(sd_mecha.deserialize_path(path), merge_device="cpu", merge_dtype=torch.float32, output_device="cpu",
                          output_dtype=torch.float32, tqdm=_quiet_bar)


def _assert_evomerge_equals_sd_mecha(doc: dict, mecha_file: Path) -> int:
    layout = load_layout(doc["architecture"])
    recipe = MergeRecipe.model_validate(doc["recipe"])
    dicts = [load_file(p["path"]) for p in doc["parents"]]
    ours = merge_state_dicts_reference(state_dicts=dicts, layout=layout, recipe=recipe)
    theirs = _sd_mecha_merge(mecha_file)
    compared = 0
    for key, tensor in ours.items():
        if key in theirs and not key.endswith("position_ids"):
            torch.testing.assert_close(theirs[key].float(), tensor, atol=1e-5, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
            compared += 1
    return compared


@pytest.mark.parametrize(("method", "merge_vae"), [("weighted_sum", False), ("weighted_sum", True), ("add_difference", False),
                                                   ("add_difference_clamped", False), ("n_average", True)])
def test_an_exported_recipe_imports_as_itself(parents: dict, method: str, merge_vae: bool, tmp_path: Path) -> None:
    layout = load_layout("sd1")
    rng = random.Random(len(method))
    params = {} if method == "n_average" else {"alpha": {b: round(rng.uniform(0.0, 1.0), 4) for b in layout.blocks}}
    recipe = MergeRecipe(method=method, params=params, seed=0, merge_vae=merge_vae)
    n = 2 if method == "weighted_sum" else 3
    file = tmp_path / "best.mecha"
    file.write_text(mecha_text(recipe=recipe, layout=layout, parent_paths=parents["files"][:n]))
    doc = import_mecha(file)
    back = MergeRecipe.model_validate(doc["recipe"])
    assert (back.method, back.merge_vae) == (method, merge_vae)
    for block in params.get("alpha", {}):
        assert back.params["alpha"][block] == pytest.approx(params["alpha"][block], abs=1e-7)  # float32 in sd-mecha
    assert [p["path"] for p in doc["parents"]] == [str(Path(f).resolve()) for f in parents["files"][:n]]


def test_sd_mechas_own_block_recipe_imports_and_merges_to_sd_mechas_tensors(parents: dict, tmp_path: Path) -> None:
    """A recipe written with sd-mecha's API (its supermerger block literal), BASE = IN00 so its
    time_embed convention agrees with evomerge's: evomerge's merge of the import is sd-mecha's merge."""
    from sd_mecha.extensions import model_configs

    blocks = list(model_configs.resolve("sd1-supermerger_blocks").keys())
    rng = random.Random(7)
    values = {b: round(rng.uniform(0.0, 1.0), 3) for b in blocks}
    values["BASE"] = values["IN00"]
    a, b = (sd_mecha.model(f, "sd1-ldm") for f in parents["files"][:2])
    node = sd_mecha.weighted_sum(a, b, alpha=sd_mecha.convert(sd_mecha.literal(values, "sd1-supermerger_blocks"), "sd1-ldm"))
    file = tmp_path / "blocks.mecha"
    file.write_text(sd_mecha.serialize(node))
    doc = import_mecha(file)
    assert doc["recipe"]["method"] == "weighted_sum"
    assert doc["recipe"]["params"]["alpha"]["OUT05"] == pytest.approx(values["OUT05"])
    assert _assert_evomerge_equals_sd_mecha(doc, file) > 1000


def test_sd_mechas_composite_add_difference_with_clamp_imports_as_the_clamped_method(parents: dict, tmp_path: Path) -> None:
    a, b, c = (sd_mecha.model(f, "sd1-ldm") for f in parents["files"])
    file = tmp_path / "clamped.mecha"
    file.write_text(sd_mecha.serialize(sd_mecha.add_difference(a, b, c, alpha=0.35, clamp_to_ab=True)))
    doc = import_mecha(file)
    # sd-mecha merges the VAE too (alpha 0.35 on every key): evomerge's merge_vae with BASE 0.35
    assert (doc["recipe"]["method"], doc["recipe"]["merge_vae"]) == ("add_difference_clamped", True)
    assert all(v == pytest.approx(0.35) for v in doc["recipe"]["params"]["alpha"].values())
    assert _assert_evomerge_equals_sd_mecha(doc, file) > 1000


def test_recipes_evomerge_cannot_hold_are_refused_with_one_line(parents: dict, tmp_path: Path) -> None:
    from sd_mecha.extensions import model_configs

    blocks = list(model_configs.resolve("sd1-supermerger_blocks").keys())
    a, b, c = (sd_mecha.model(f, "sd1-ldm") for f in parents["files"])
    split = {k: 0.2 for k in blocks} | {"BASE": 0.9}  # time_embed would get BASE's 0.9, input_blocks.0 IN00's 0.2
    cases = {
        "split.mecha": (sd_mecha.weighted_sum(a, b, alpha=sd_mecha.convert(sd_mecha.literal(split, "sd1-supermerger_blocks"), "sd1-ldm")),
                        "block IN00 gets"),
        "ties.mecha": (sd_mecha.ties_sum(sd_mecha.subtract(b, a), sd_mecha.subtract(c, a), k=0.5), ""),
        "nested.mecha": (sd_mecha.weighted_sum(sd_mecha.weighted_sum(a, b, alpha=0.5), c, alpha=0.3), "fit no evomerge method"),
    }
    for name, (node, needle) in cases.items():
        file = tmp_path / name
        file.write_text(sd_mecha.serialize(node))
        with pytest.raises(ExportError) as info:
            import_mecha(file)
        message = str(info.value)
        assert message.startswith("import: ") and "\n" not in message and needle in message, (name, message)
    (tmp_path / "junk.mecha").write_text("this is not a recipe\n")
    with pytest.raises(ExportError, match="sd-mecha cannot read it"):
        import_mecha(tmp_path / "junk.mecha")


def test_the_cli_imports_finds_moved_parents_and_replays_to_sd_mechas_merge(parents: dict, tmp_path: Path) -> None:
    import shutil

    a, b = (sd_mecha.model(f, "sd1-ldm") for f in parents["files"][:2])
    file = tmp_path / "scalar.mecha"
    file.write_text(sd_mecha.serialize(sd_mecha.weighted_sum(a, b, alpha=0.25)))
    out = tmp_path / "best.yaml"
    result = runner.invoke(app, ["import", str(file), "-o", str(out)])
    assert result.exit_code == 0, result.output
    from optimizer.study.export import load_recipe_document

    doc = load_recipe_document(out)  # what replay, render and compare read
    assert doc["recipe"]["merge_vae"] is True and doc["mbw"]["alpha"].split(",") == ["0.25"] * 26
    assert _assert_evomerge_equals_sd_mecha(doc, file) > 1000
    # the same import again refuses to overwrite, and changes nothing
    before = out.read_bytes()
    result = runner.invoke(app, ["import", str(file), "-o", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and out.read_bytes() == before
    # moved models: one line naming the file, then --parents DIR finds them
    moved = tmp_path / "moved"
    moved.mkdir()
    text = file.read_text().replace(str(Path(parents["files"][0]).parent), str(tmp_path / "gone"))
    (tmp_path / "moved.mecha").write_text(text)
    result = runner.invoke(app, ["import", str(tmp_path / "moved.mecha"), "-o", str(tmp_path / "m.yaml")])
    assert result.exit_code == 2 and "parent 0" in result.output and "--parents DIR" in result.output, result.output
    for f in parents["files"][:2]:
        shutil.copy(f, moved)
    result = runner.invoke(app, ["import", str(tmp_path / "moved.mecha"), "--parents", str(moved), "-o", str(tmp_path / "m.yaml")])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "m.yaml").read_text())["parents"][0]["path"] == str((moved / "p0.safetensors").resolve())


@pytest.mark.parametrize("architecture", ["sd3", "flux"])
def test_dit_recipes_round_trip_and_a_merged_text_encoder_is_refused(architecture: str, tmp_path: Path) -> None:
    """SD3 and Flux (sd-mecha's sd3-comfyui and flux-flux configs): an exported per-block recipe imports
    as itself; sd-mecha's scalar weighted_sum, which merges the text encoders and VAE too, is one line."""
    from sd_mecha.extensions import model_configs

    from optimizer.study.mecha import MODEL_CONFIGS

    keys = [k for k, meta in model_configs.resolve(MODEL_CONFIGS[architecture]).keys().items() if not meta.optional]
    files = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        save_file({k: torch.randn(2, 3, generator=g) for k in keys}, str(tmp_path / f"{architecture}{seed}.safetensors"))
        files.append(str(tmp_path / f"{architecture}{seed}.safetensors"))
    layout = load_layout(architecture)
    rng = random.Random(architecture)
    recipe = MergeRecipe(method="weighted_sum", params={"alpha": {b: round(rng.uniform(0, 1), 4) for b in layout.blocks}}, seed=0)
    (tmp_path / "best.mecha").write_text(mecha_text(recipe=recipe, layout=layout, parent_paths=files))
    doc = import_mecha(tmp_path / "best.mecha")
    assert doc["architecture"] == architecture and doc["recipe"]["merge_vae"] is False
    for block, value in recipe.params["alpha"].items():
        assert doc["recipe"]["params"]["alpha"][block] == pytest.approx(value, abs=1e-7)
    a, b = (sd_mecha.model(f, MODEL_CONFIGS[architecture]) for f in files)
    (tmp_path / "scalar.mecha").write_text(sd_mecha.serialize(sd_mecha.weighted_sum(a, b, alpha=0.3)))
    with pytest.raises(ExportError, match=r"the components \(VAE, text encoders\) get 0.3 on .*copies them from the first parent"):
        import_mecha(tmp_path / "scalar.mecha")
