"""The ComfyUI workflow export, checked against ComfyUI's node definitions and merge rule.

* Each architecture's node inputs are the ones in ComfyUI's source (``tests/reference/comfyui_nodes.json``,
  transcribed from ``comfy_extras/nodes_model_merging_model_specific.py``), in order.
* ComfyUI applied to the exported widgets (its ``ModelMergeBlocks.execute`` rule: the longest input
  a key starts with, ``ratio * model1 + (1 - ratio) * model2``; ``CLIPMergeSimple`` the same over the
  text encoders, ``position_ids`` and ``logit_scale`` kept) gives evomerge's merge, tensor for
  tensor, on tiny models of every architecture built with diffusers' classes (whose keys are
  sd-mecha's, tests/test_architectures_dit.py).
* The file has the structure of the workflows ComfyUI saves (comfyui-workflow-templates-json's
  real workflows), when that package is installed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from optimizer.architectures.layout import available_layouts, load_layout
from optimizer.merge import MergeRecipe, merge_state_dicts_reference
from optimizer.study.comfyui import comfyui_workflow
from optimizer.study.export import ExportError

REFERENCE = json.loads((Path(__file__).parent / "reference" / "comfyui_nodes.json").read_text(encoding="utf-8"))["nodes"]
ARCHITECTURES = ["sd1", "sd2", "sdxl", "sd3", "sd35_large", "flux"]


def comfyui_ratio(key: str, ratios: dict[str, float]) -> float:
    """ComfyUI's ModelMergeBlocks.execute: the value of the longest input ``key`` starts with, else the first input's."""
    ratio, longest = next(iter(ratios.values())), 0
    for name, value in ratios.items():
        if key.startswith(name) and longest < len(name):
            ratio, longest = value, len(name)
    return ratio


def comfyui_merge(workflow: dict, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, text_prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """What the exported graph computes in ComfyUI, from ComfyUI's own rules (see the module docstring)."""
    nodes = {n["type"]: n for n in workflow["nodes"]}
    merge = next(n for n in workflow["nodes"] if n["type"].startswith("ModelMerge"))
    names = [name for name, kind in REFERENCE[merge["type"]]["inputs"] if kind == "FLOAT"]
    ratios = dict(zip(names, merge["widgets_values"], strict=True))
    clip = nodes.get("CLIPMergeSimple")
    out = {}
    for key, tensor in a.items():
        if key.startswith("model.diffusion_model."):
            r = comfyui_ratio(key.removeprefix("model.diffusion_model."), ratios)
        elif clip is not None and key.startswith(text_prefixes) and not key.endswith((".position_ids", ".logit_scale")):
            r = clip["widgets_values"][0]
        else:
            r = 1.0  # the VAE (and the DiT text encoders) come from parent 0's loader
        out[key] = r * tensor + (1.0 - r) * b[key] if tensor.is_floating_point() else tensor
    return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pair(request) -> dict:
    """Two tiny models of the architecture (diffusers' classes), canonical single-file keys."""
    from tests.tiny_archs import tiny_state_dict

    return {"architecture": request.param, "dicts": [tiny_state_dict(request.param, seed) for seed in (0, 1)]}


def _recipe(layout, *, seed: int, merge_vae: bool = False) -> MergeRecipe:
    rng = random.Random(seed)
    return MergeRecipe(method="weighted_sum", params={"alpha": {b: rng.uniform(0.0, 1.0) for b in layout.blocks}}, seed=0, merge_vae=merge_vae)


def _doc(paths: list[str]) -> dict:
    return {"study": "s", "trial": 3, "parents": [{"path": p, "sha256": f"{i:064d}"} for i, p in enumerate(paths)], "mbw": {}}


def test_every_architecture_names_comfyuis_node_inputs_in_order() -> None:
    for name in available_layouts():
        spec = load_layout(name).spec.comfyui
        assert spec is not None, f"{name} has no ComfyUI merge node"
        want = [n for n, kind in REFERENCE[spec.node]["inputs"] if kind == "FLOAT"]
        assert [n for n, _ in spec.expanded()] == want, name


def test_comfyui_merging_the_exported_workflow_gives_evomerges_merge(pair: dict, tmp_path: Path) -> None:
    layout = load_layout(pair["architecture"])
    a, b = pair["dicts"]
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    recipe = _recipe(layout, seed=len(layout.blocks))
    workflow = comfyui_workflow(recipe=recipe, layout=layout, parent_paths=paths, doc=_doc(paths))
    text_prefixes = ("cond_stage_model.", "conditioner.embedders.")
    ours = merge_state_dicts_reference(state_dicts=[a, b], recipe=recipe, layout=layout)
    theirs = comfyui_merge(workflow, a, b, text_prefixes=text_prefixes)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=1e-5) and not k.endswith(".logit_scale")]
    assert not different, different[:5]
    # the keys span many blocks with different alphas, so a wrong input -> block mapping shows as a mismatch
    owners = {layout.owner_of(k) for k in a if k.startswith("model.diffusion_model.")}
    assert owners <= set(layout.blocks) and len(owners) > 3


def test_the_workflow_has_comfyuis_nodes_links_and_saved_workflow_shape(pair: dict, tmp_path: Path) -> None:
    layout = load_layout(pair["architecture"])
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    workflow = comfyui_workflow(recipe=_recipe(layout, seed=1), layout=layout, parent_paths=paths, doc=_doc(paths))
    assert workflow["version"] == 0.4 and workflow["last_node_id"] == len(workflow["nodes"]) and workflow["last_link_id"] == len(workflow["links"])
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        ref = REFERENCE[node["type"]]
        linked = [n for n, kind in ref["inputs"] if kind in ("MODEL", "CLIP", "VAE")]
        widgets = [n for n, kind in ref["inputs"] if kind not in ("MODEL", "CLIP", "VAE")]
        assert [i["name"] for i in node["inputs"]] == linked and len(node["widgets_values"]) == len(widgets), node["type"]
        assert [o["type"] for o in node["outputs"]] == ref["outputs"]
        assert all(i["link"] is not None for i in node["inputs"]), f"{node['type']} has an unconnected input"
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        assert link_id in by_id[origin]["outputs"][slot]["links"] and by_id[target]["inputs"][target_slot]["link"] == link_id
        assert by_id[origin]["outputs"][slot]["type"] == kind == by_id[target]["inputs"][target_slot]["type"]
        assert by_id[origin]["order"] < by_id[target]["order"]  # executable in the listed order
    merge = next(n for n in workflow["nodes"] if n["type"].startswith("ModelMerge"))
    assert all(0.0 <= v <= 1.0 for v in merge["widgets_values"])
    assert [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple"] == ["a.safetensors", "b.safetensors"]


def test_the_workflow_has_the_shape_of_workflows_comfyui_saves(tmp_path: Path) -> None:
    templates = pytest.importorskip("comfyui_workflow_templates_json", reason="comfyui-workflow-templates-json (a dev dependency) holds real saved workflows")
    root = Path(templates.__file__).parent / "templates"
    saved = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.glob("*.json"))]
    saved = [w for w in saved if isinstance(w, dict) and w.get("version") == 0.4 and any(n.get("type") == "CheckpointLoaderSimple" for n in w.get("nodes", []))]
    assert saved, "no saved workflow with a CheckpointLoaderSimple in the templates"
    layout = load_layout("sd1")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    ours = comfyui_workflow(recipe=_recipe(layout, seed=2), layout=layout, parent_paths=paths, doc=_doc(paths))
    top = set.intersection(*(set(w) for w in saved))  # the fields every saved workflow has
    assert top <= set(ours), top - set(ours)
    loaders = [n for w in saved for n in w["nodes"] if n.get("type") == "CheckpointLoaderSimple"]
    fields = set.intersection(*(set(n) for n in loaders))
    for mine in (n for n in ours["nodes"] if n["type"] == "CheckpointLoaderSimple"):
        assert fields <= set(mine), fields - set(mine)
        assert all([(o["name"], o["type"]) for o in n["outputs"]] == [(o["name"], o["type"]) for o in mine["outputs"]] for n in loaders)
    assert all(len(link) == 6 for w in saved for link in w["links"] if isinstance(link, list))
    assert all(len(link) == 6 and isinstance(link[0], int) for link in ours["links"])
    assert json.loads(json.dumps(ours)) == ours  # plain JSON


def test_bare_transformer_parents_load_with_unet_loader_and_save_with_model_save(tmp_path: Path) -> None:
    from optimizer.testing.tiny_dit import tiny_dit_canonical_state_dict, tiny_dit_components

    layout = load_layout("flux")
    paths = []
    for seed in (0, 1):
        sd = tiny_dit_canonical_state_dict(tiny_dit_components("flux-dev", seed), "flux-dev")
        bare = {k.removeprefix("model.diffusion_model."): v.contiguous() for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        save_file(bare, str(tmp_path / f"bare{seed}.safetensors"))
        paths.append(str(tmp_path / f"bare{seed}.safetensors"))
    workflow = comfyui_workflow(recipe=_recipe(layout, seed=3), layout=layout, parent_paths=paths, doc=_doc(paths))
    kinds = [n["type"] for n in workflow["nodes"]]
    assert kinds == ["UNETLoader", "UNETLoader", "ModelMergeFlux1", "ModelSave"]
    assert workflow["nodes"][0]["widgets_values"] == ["bare0.safetensors", "default"]
    assert workflow["nodes"][0]["widgets_values"][1] in REFERENCE["UNETLoader"]["choices"]["weight_dtype"]
    assert workflow["nodes"][-1]["widgets_values"] == ["diffusion_models/evomerge-s-trial3"]


def test_the_same_recipe_gives_the_same_bytes(tmp_path: Path) -> None:
    from optimizer.study.comfyui import comfyui_text

    layout = load_layout("sdxl")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    texts = {comfyui_text(recipe=_recipe(layout, seed=4), layout=layout, parent_paths=paths, doc=_doc(paths)) for _ in range(2)}
    assert len(texts) == 1


@pytest.mark.parametrize("case", ["ties", "three_parents", "merge_vae", "loras", "hypernetworks", "recalibrate", "diffusers_folder"])
def test_what_comfyui_cannot_express_is_refused_with_one_line(case: str, tmp_path: Path) -> None:
    layout = load_layout("sd1")
    paths = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    recipe = _recipe(layout, seed=5, merge_vae=case == "merge_vae")
    doc = _doc(paths)
    needle = {"ties": "interpolate two models", "three_parents": "interpolate two models", "merge_vae": "no VAE merge node",
              "loras": "LoRA", "hypernetworks": "hypernetwork", "recalibrate": "recalibrates", "diffusers_folder": "single files"}[case]
    if case == "ties":
        recipe = MergeRecipe(method="ties", params={"alpha": recipe.params["alpha"], "density": {b: 0.5 for b in layout.blocks}}, seed=0)
        paths = paths + [str(tmp_path / "c.safetensors")]
        doc = _doc(paths)
    elif case == "three_parents":
        paths = paths + [str(tmp_path / "c.safetensors")]
        doc = _doc(paths)
    elif case in ("loras", "hypernetworks"):
        doc[case] = [{"name": "x", "path": "x.safetensors", "sha256": "0" * 64}]
    elif case == "recalibrate":
        doc["recalibrate"] = {"images": 8}
    elif case == "diffusers_folder":
        paths[1] = str(tmp_path / "folder")
        doc = _doc(paths)
    with pytest.raises(ExportError, match=needle) as info:
        comfyui_workflow(recipe=recipe, layout=layout, parent_paths=paths, doc=doc)
    assert "\n" not in str(info.value) and str(info.value).startswith("--format comfyui: ")
