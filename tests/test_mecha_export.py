"""The .mecha export against sd-mecha itself: the exported file, deserialized and merged by
sd-mecha, gives evomerge's merge of the same parents, key for key."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from optimizer.architectures.layout import load_layout
from optimizer.merge import MergeRecipe, merge_state_dicts_reference
from optimizer.study.export import ExportError
from optimizer.study.mecha import EXPORTED, mecha_text

sd_mecha = pytest.importorskip("sd_mecha")


def _quiet_bar(*args, **kwargs):
    """sd-mecha's progress bar, switched off."""
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@pytest.fixture(scope="module", params=["sd1", "sdxl", "sd3", "flux"])
def parents(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three files with every key sd-mecha's model config requires (small shapes: sd-mecha reads keys, not shapes)."""
    from sd_mecha.extensions import model_configs

    from optimizer.study.mecha import MODEL_CONFIGS

    root = tmp_path_factory.mktemp("mecha")
    keys = [k for k, meta in model_configs.resolve(MODEL_CONFIGS[request.param]).keys().items() if not meta.optional]
    layout = load_layout(request.param)
    files, dicts = [], []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        sd = {k: torch.randn(3, 4, generator=g) for k in keys}
        for k in sd:
            if k.endswith("position_ids"):
                sd[k] = torch.arange(12, dtype=torch.float32).view(3, 4)
        save_file(sd, str(root / f"p{seed}.safetensors"))
        files.append(str(root / f"p{seed}.safetensors"))
        dicts.append({k: v for k, v in sd.items() if not any(re.match(p, k) for p in layout.spec.ignore)})  # dropped on load
    return {"files": files, "dicts": dicts, "architecture": request.param}


def _recipe(method: str, *, merge_vae: bool, seed: int, architecture: str) -> MergeRecipe:
    layout = load_layout(architecture)
    rng = random.Random(seed)
    params = {} if method == "n_average" else {"alpha": {b: rng.uniform(0.0, 1.0) for b in layout.blocks}}
    return MergeRecipe(method=method, params=params, seed=0, merge_vae=merge_vae)


#: every exported method, the VAE copied and merged (n_average only merged: refused otherwise, tested below)
CASES = [("weighted_sum", False), ("weighted_sum", True), ("add_difference", False), ("add_difference_clamped", True), ("n_average", True)]
assert {m for m, _ in CASES} == set(EXPORTED)


@pytest.mark.parametrize(("method", "merge_vae"), CASES)
def test_sd_mecha_merges_the_exported_recipe_into_evomerges_merge(parents: dict, method: str, merge_vae: bool, tmp_path: Path) -> None:
    if parents["architecture"] == "sdxl" and (method, merge_vae) != ("weighted_sum", True):
        pytest.skip("SDXL: one lerp over every key of its config (VAE included) covers the key mapping; the methods are covered on SD1")
    if parents["architecture"] in ("sd3", "flux") and (method, merge_vae) != ("weighted_sum", False):
        pytest.skip("SD3 / Flux: one lerp over every key of its config (text encoders and VAE copied) covers the key mapping")
    n = 2 if method == "weighted_sum" else 3
    layout = load_layout(parents["architecture"])
    recipe = _recipe(method, merge_vae=merge_vae, seed=len(method), architecture=parents["architecture"])
    text = mecha_text(recipe=recipe, layout=layout, parent_paths=parents["files"][:n])
    (tmp_path / "best.mecha").write_text(text)
    merged = sd_mecha.merge(sd_mecha.deserialize_path(tmp_path / "best.mecha"), merge_device="cpu", merge_dtype=torch.float32,
                            output_device="cpu", output_dtype=torch.float32, tqdm=_quiet_bar)
    ours = merge_state_dicts_reference(state_dicts=parents["dicts"][:n], layout=layout, recipe=recipe)
    compared = 0
    missing = [k for k in ours if k not in merged]
    assert all(k.endswith("position_ids") for k in missing)  # optional in sd-mecha's configs
    for key, tensor in ours.items():
        if key not in merged:
            continue
        torch.testing.assert_close(merged[key].float(), tensor, atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
        compared += 1
    assert compared > 1000
    blocks = {layout.owner_of(k) for k in ours if not k.startswith("first_stage")}
    assert blocks >= set(layout.blocks)  # every block of the recipe took part


def test_methods_without_an_sd_mecha_twin_are_refused_with_one_line(parents: dict) -> None:
    layout = load_layout(parents["architecture"])
    for method, message in (("ties", "no sd-mecha method of the same formula"), ("n_average", "merge_vae")):
        recipe = MergeRecipe.uniform(method=method, layout=layout)
        with pytest.raises(ExportError, match=message):
            mecha_text(recipe=recipe, layout=layout, parent_paths=parents["files"])
