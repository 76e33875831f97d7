"""Exporting a recipe as a ComfyUI workflow (``export --format comfyui``).

The workflow (ComfyUI's saved-workflow JSON, version 0.4: drag it onto the ComfyUI canvas) loads
both parents, merges them with the architecture's model-specific merge node (``ModelMergeSD1``,
``ModelMergeSD2``, ``ModelMergeSDXL``, ``ModelMergeSD3_2B``, ``ModelMergeSD35_Large``,
``ModelMergeFlux1``: the layout's ``comfyui`` record names the node and which evomerge block each
of its inputs carries), merges the text encoders with ``CLIPMergeSimple`` where evomerge merges them
(the BASE block of SD1 / SD2 / SDXL), and saves the result with ``CheckpointSave``.

ComfyUI's formula, read from its source (``comfy_extras/nodes_model_merging.py``: ``ModelMergeBlocks``
and ``CLIPMergeSimple`` call ``add_patches({k: model2[k]}, 1 - ratio, ratio)``)::

    merged[k] = ratio(k) * model1[k] + (1 - ratio(k)) * model2[k]

where ``ratio(k)`` is the input with the longest name that ``k`` (without ``diffusion_model.``)
starts with, else the node's first input. ComfyUI's ratio is the share of **model1**; evomerge's
alpha is the share of the second parent, so every input gets ``1 - alpha`` of its block.
(ComfyUI's generated node documentation says the opposite for ``CLIPMergeSimple``; the code is
what runs.) ``CLIPMergeSimple`` skips ``position_ids`` (evomerge too) and ``logit_scale`` (a
scalar the text features do not use; evomerge merges it with BASE).

Exported exactly: two-parent ``weighted_sum`` recipes, the VAE (and, for SD3 / Flux, the text
encoders) from the first parent. Refused with one line: other methods, LoRA strengths,
hypernetworks, recalibrated norms, ``merge_vae`` (ComfyUI has no VAE merge node) and diffusers
folders (ComfyUI's loaders read single files). Bare transformer files (Flux's
``flux1-dev.safetensors``) are loaded with ``UNETLoader`` and saved with ``ModelSave``; a parent
that is not on disk is taken to be a full checkpoint. The ratios are written at full precision
(ComfyUI's widgets show two decimals and round a value when it is edited).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimizer.architectures.layout import BlockLayout
from optimizer.merge import MergeRecipe
from optimizer.study.export import ExportError

__all__ = ["comfyui_ratios", "comfyui_workflow", "loads_as_unet"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def comfyui_ratios(*, recipe: MergeRecipe, layout: BlockLayout) -> list[tuple[str, float]]:
    """``(input name, ratio)`` of the layout's ComfyUI merge node, in the node's order: ``1 - alpha``
    of the block the input carries."""
    if layout.spec.comfyui is None:
        raise ExportError(f"--format comfyui: ComfyUI has no model-specific merge node for {layout.name}")
    alpha = recipe.params["alpha"]
    return [(name, 1.0 - float(alpha[block])) for name, block in layout.spec.comfyui.expanded()]


def loads_as_unet(path: str, *, layout: BlockLayout) -> bool:
    """True when ``path`` is a bare transformer file (no ``bare_prefix`` keys): ComfyUI loads it with
    ``UNETLoader``. A file that is not on disk (a moved parent) counts as a full checkpoint."""
    prefix = layout.spec.bare_prefix
    if prefix is None or not Path(path).is_file() or Path(path).suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return not any(k.startswith(prefix) for k in handle.keys())


def _check(recipe: MergeRecipe, layout: BlockLayout, parent_paths: Sequence[str], doc: dict[str, Any]) -> None:
    if recipe.method != "weighted_sum" or len(parent_paths) != 2:
        raise ExportError(f"--format comfyui: ComfyUI's merge nodes interpolate two models; this recipe is {recipe.method} of "
                          f"{len(parent_paths)} parents (exported: weighted_sum of two)")
    if recipe.loras or doc.get("loras"):
        raise ExportError("--format comfyui: the recipe sets per-block LoRA strengths, which ComfyUI's LoRA loader cannot express")
    if doc.get("hypernetworks"):
        raise ExportError("--format comfyui: the recipe sets hypernetwork strengths, which ComfyUI's merge nodes cannot express")
    if doc.get("recalibrate"):
        raise ExportError("--format comfyui: the recipe recalibrates norms, which ComfyUI cannot replay; export --format safetensors")
    if recipe.merge_vae:
        raise ExportError("--format comfyui: the recipe merges the VAE, and ComfyUI has no VAE merge node; export --format safetensors")
    if layout.spec.comfyui is None:
        raise ExportError(f"--format comfyui: ComfyUI has no model-specific merge node for {layout.name}")
    for i, path in enumerate(parent_paths):
        if Path(path).suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ExportError(f"--format comfyui: parent {i} ({path}) is not a single file, and ComfyUI's loaders read single files; "
                              "save it with evomerge merge --format safetensors first")


class _Graph:
    """Nodes and links of a saved ComfyUI workflow, built left to right."""

    def __init__(self) -> None:
        self.nodes: list[dict[str, Any]] = []
        self.links: list[list[Any]] = []

    def node(self, kind: str, *, title: str, inputs: Sequence[tuple[str, str]] = (), outputs: Sequence[str] = (),
             widgets: Sequence[Any] = (), column: int, row: int) -> int:
        number = len(self.nodes) + 1
        height = 60 + 26 * (len(inputs) + len(widgets))
        self.nodes.append({
            "id": number, "type": kind, "pos": [60 + 420 * column, 60 + 260 * row], "size": [360, height], "flags": {},
            "order": number - 1, "mode": 0,
            "inputs": [{"name": name, "type": type_, "link": None} for name, type_ in inputs],
            "outputs": [{"name": type_, "type": type_, "slot_index": i, "links": []} for i, type_ in enumerate(outputs)],
            "title": title, "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets),
        })
        return number

    def link(self, source: int, slot: int, target: int, name: str) -> None:
        number = len(self.links) + 1
        origin, dest = self.nodes[source - 1], self.nodes[target - 1]
        target_slot = next(i for i, item in enumerate(dest["inputs"]) if item["name"] == name)
        type_ = origin["outputs"][slot]["type"]
        origin["outputs"][slot]["links"].append(number)
        dest["inputs"][target_slot]["link"] = number
        self.links.append([number, source, slot, target, target_slot, type_])


def comfyui_workflow(*, recipe: MergeRecipe, layout: BlockLayout, parent_paths: Sequence[str], doc: dict[str, Any]) -> dict[str, Any]:
    """The saved ComfyUI workflow of a recipe document ``doc`` on ``parent_paths`` (see the module docstring)."""
    _check(recipe, layout, parent_paths, doc)
    spec = layout.spec.comfyui
    assert spec is not None
    graph = _Graph()
    loaders, unets = [], []
    for i, path in enumerate(parent_paths):
        unet = loads_as_unet(path, layout=layout)
        name = Path(path).name
        if unet:
            loaders.append(graph.node("UNETLoader", title=f"parent {i}: {name}", outputs=["MODEL"], widgets=[name, "default"], column=0, row=i))
        else:
            loaders.append(graph.node("CheckpointLoaderSimple", title=f"parent {i}: {name}", outputs=["MODEL", "CLIP", "VAE"],
                                      widgets=[name], column=0, row=i))
        unets.append(unet)
    ratios = comfyui_ratios(recipe=recipe, layout=layout)
    merge = graph.node(spec.node, title=f"evomerge {doc.get('study', '')} trial {doc.get('trial', '')}".strip(),
                       inputs=[("model1", "MODEL"), ("model2", "MODEL")], outputs=["MODEL"], widgets=[r for _, r in ratios], column=1, row=0)
    graph.link(loaders[0], 0, merge, "model1")
    graph.link(loaders[1], 0, merge, "model2")
    prefix = f"evomerge-{doc.get('study', 'merge')}-trial{doc.get('trial', 0)}"
    if unets[0]:
        save = graph.node("ModelSave", title="save the merge", inputs=[("model", "MODEL")], widgets=[f"diffusion_models/{prefix}"], column=2, row=0)
        graph.link(merge, 0, save, "model")
    else:
        clip_source, clip_slot = loaders[0], 1
        if spec.clip is not None:
            if unets[1]:
                raise ExportError("--format comfyui: parent 1 is a bare transformer file, so it has no text encoder to merge")
            clip_ratio = 1.0 - float(recipe.params["alpha"][spec.clip])
            clip_source = graph.node("CLIPMergeSimple", title="text encoders", inputs=[("clip1", "CLIP"), ("clip2", "CLIP")], outputs=["CLIP"],
                                     widgets=[clip_ratio], column=1, row=1)
            clip_slot = 0
            graph.link(loaders[0], 1, clip_source, "clip1")
            graph.link(loaders[1], 1, clip_source, "clip2")
        save = graph.node("CheckpointSave", title="save the merge", inputs=[("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")],
                          widgets=[f"checkpoints/{prefix}"], column=2, row=0)
        graph.link(merge, 0, save, "model")
        graph.link(clip_source, clip_slot, save, "clip")
        graph.link(loaders[0], 2, save, "vae")
    provenance = {"study": doc.get("study"), "trial": doc.get("trial"), "architecture": layout.name,
                  "parents": [{"name": Path(p).name, "sha256": listed.get("sha256")} for p, listed in zip(parent_paths, doc["parents"], strict=True)],
                  "mbw": doc.get("mbw", {})}
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, "evomerge:" + json.dumps(provenance, sort_keys=True))),
        "revision": 0, "last_node_id": len(graph.nodes), "last_link_id": len(graph.links),
        "nodes": graph.nodes, "links": graph.links, "groups": [], "config": {},
        "extra": {"evomerge": provenance}, "version": 0.4,
    }


def comfyui_text(*, recipe: MergeRecipe, layout: BlockLayout, parent_paths: Sequence[str], doc: dict[str, Any]) -> str:
    """:func:`comfyui_workflow` as JSON text (same inputs, same bytes)."""
    return json.dumps(comfyui_workflow(recipe=recipe, layout=layout, parent_paths=parent_paths, doc=doc), indent=2) + "\n"
