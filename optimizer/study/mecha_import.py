"""Importing an sd-mecha recipe (``.mecha``) as an evomerge recipe document (``evomerge import``).

sd-mecha itself says what the recipe computes. Its models are replaced by *probe* files (every key
of the models' sd-mecha config, 8 values each) and sd-mecha merges the recipe over them:

1. one merge of probes where model ``i`` is 1 at position ``i`` and 0 elsewhere gives the weight
   ``w_i[k]`` of each model in each key (non-zero positions past the models' count: not an
   elementwise linear merge);
2. the weights are matched to an evomerge method: ``weighted_sum`` (two models,
   ``w = (1 - alpha, alpha)``), ``add_difference`` (three, ``w = (1, alpha, -alpha)``; a third
   weight of 0 suggests sd-mecha's ``clamp_to_ab``), ``n_average`` (``w_i = 1/n``);
3. the per-key alphas are grouped by evomerge's blocks: every key of a block must have the same
   value, and the VAE keys 0 (copied from the first parent) or all BASE's value (``merge_vae``);
   anything else is refused with one line naming the block and two keys that differ (sd-mecha's
   block literal puts ``time_embed`` in BASE, evomerge in IN00: such a recipe imports only where
   BASE and IN00 agree); sd-mecha holds parameters as float32, so values come back rounded to 7 decimals;
4. the candidate recipe is checked on a random probe: evomerge's own merge of the probe must equal
   sd-mecha's (for ``add_difference``, unclamped then clamped), or the file is refused.

Supported: recipes over models of sd-mecha's ``sd1-ldm``, ``sdxl-sgm``, ``sd3-comfyui`` (SD3 / 3.5 Medium) and ``flux-flux`` configs, whatever graph
sd-mecha uses to express them (the exporter's per-key literal, block literals and their
conversion, scalars, sd-mecha's composite ``add_difference``). The parents are the files the recipe
names (relative paths from the recipe's folder), hashed for the document; ``parents_dir`` finds them
by file name.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from optimizer.architectures.layout import BlockLayout, LayoutError, load_layout
from optimizer.merge import NON_MERGEABLE_PATTERNS, VAE_PARAMS_BLOCK, MergeRecipe, merge_state_dicts_reference
from optimizer.study.export import ExportError
from optimizer.study.mecha import MODEL_CONFIGS

__all__ = ["block_params", "import_mecha"]

_MODEL_LINE = re.compile(r'^(\s*model\s+)"((?:[^"\\]|\\.)*)"(.*)$')
_CONFIG = re.compile(r'model_config="([^"]+)"')
_TOLERANCE = 1e-6
_PROBE_WIDTH = 8


def _fail(message: str) -> ExportError:
    return ExportError(f"import: {message}")


def _quiet_bar(*args: Any, **kwargs: Any):
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


def block_params(values: Mapping[str, float], *, layout: BlockLayout) -> tuple[dict[str, float], bool]:
    """``(alpha per block, merge_vae)`` from per-key alphas (step 3 of the module docstring)."""
    seen: dict[str, tuple[str, float]] = {}
    component: list[tuple[str, float]] = []
    for key, value in values.items():
        owner = _owner(layout, key)
        if owner is None:
            continue
        if owner in layout.components:
            component.append((key, value))
            continue
        first = seen.setdefault(owner, (key, value))
        if abs(first[1] - value) > _TOLERANCE:
            raise _fail(f"block {owner} gets {first[1]:.6g} on {first[0]} but {value:.6g} on {key}: an evomerge recipe holds one "
                        "value per block (sd-mecha's block literal puts time_embed in BASE, evomerge in IN00)")
    missing = [b for b in layout.blocks if b not in seen]
    if missing:
        raise _fail(f"the recipe gives no value to blocks {', '.join(missing)}")
    alpha = {b: round(seen[b][1], 7) for b in layout.blocks}  # sd-mecha holds parameters as float32: 7 decimals come back
    if all(abs(v) <= _TOLERANCE for _, v in component):
        return alpha, False
    base = alpha.get(VAE_PARAMS_BLOCK)
    if base is not None and all(abs(v - base) <= _TOLERANCE for _, v in component):
        return alpha, True
    key, value = next((k, v) for k, v in component if abs(v) > _TOLERANCE)
    where = f"copies them from the first parent (0) or merges them with {VAE_PARAMS_BLOCK}'s value" if base is not None else "copies them from the first parent (0)"
    raise _fail(f"the components (VAE, text encoders) get {value:.6g} on {key}: evomerge {where}")


def _owner(layout: BlockLayout, key: str) -> str | None:
    """The evomerge block or component of ``key``; None for keys evomerge does not merge."""
    if any(p.search(key) for p in NON_MERGEABLE_PATTERNS):
        return None
    try:
        return layout.owner_of(key)
    except LayoutError:
        return None  # sd-mecha's noise-schedule buffers and other keys outside evomerge's layout


class _Prober:
    """Merges the recipe text with sd-mecha over probe models (one temporary folder)."""

    def __init__(self, lines: list[str], models: list[tuple[int, str]], config: str, scratch: Path) -> None:
        from sd_mecha.extensions import model_configs

        self.lines, self.models, self.config, self.scratch = lines, models, config, scratch
        self.keys = [k for k, meta in model_configs.resolve(config).keys().items() if not meta.optional]
        self.count = 0

    def merge(self, probes: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        import sd_mecha
        from safetensors.torch import save_file

        lines = list(self.lines)
        for (index, _), probe in zip(self.models, probes, strict=True):
            self.count += 1
            path = self.scratch / f"probe{self.count}.safetensors"
            save_file(probe, str(path))
            head = _MODEL_LINE.match(lines[index])
            assert head is not None
            lines[index] = f'{head.group(1)}{json.dumps(str(path))}{head.group(3)}'
        out: dict[str, torch.Tensor] = {}
        sd_mecha.merge(sd_mecha.deserialize(lines), merge_device="cpu", merge_dtype=torch.float64, output_device="cpu",
                       output_dtype=torch.float64, output=out, threads=0, tqdm=_quiet_bar)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}  # sd-mecha adds __metadata__


def _weights(prober: _Prober, n: int) -> dict[str, list[float]]:
    """``w[k] = [w_0, ..., w_{n-1}]``: each model's weight in key ``k`` (step 1), from one merge:
    model ``i``'s probe is 1 at position ``i`` and 0 elsewhere, so position ``i`` of a linear
    merge's output is ``w_i`` (and the positions past ``n`` are 0)."""
    probes = []
    for i in range(n):
        row = torch.zeros(_PROBE_WIDTH, dtype=torch.float64)
        row[i] = 1.0
        probes.append({k: row.clone() for k in prober.keys})
    weights: dict[str, list[float]] = {}
    for key, tensor in prober.merge(probes).items():
        flat = tensor.reshape(-1)
        if flat.numel() != _PROBE_WIDTH or float(flat[n:].abs().max()) > _TOLERANCE:
            raise _fail(f"key {key}: the recipe is not an elementwise weighted merge of its models (no evomerge method)")
        weights[key] = [float(x) for x in flat[:n]]
    return weights


def _candidates(weights: Mapping[str, list[float]], n: int) -> list[tuple[str, dict[str, float]]]:
    """``(method, per-key alpha)`` the weights fit (step 2), most likely first."""
    def every(test) -> bool:
        return all(test(w) for w in weights.values())

    close = lambda a, b: abs(a - b) <= _TOLERANCE  # noqa: E731
    alphas = {k: w[1] for k, w in weights.items()} if n >= 2 else {}
    found: list[tuple[str, dict[str, float]]] = []
    if n == 2 and every(lambda w: close(w[0] + w[1], 1.0)):
        found.append(("weighted_sum", alphas))
    if n == 3 and every(lambda w: close(w[0], 1.0)):
        if every(lambda w: close(w[2], -w[1])):
            found.append(("add_difference", alphas))
        if every(lambda w: close(w[2], 0.0)):  # clamp_to_ab: C alone (A = B = 0) is clamped to 0
            found.append(("add_difference_clamped", alphas))
    if 2 <= n <= 5 and any(all(close(x, 1.0 / n) for x in w) for w in weights.values()):
        found.append(("n_average", {}))  # the VAE may be parent 0's: the random probe decides
    return found


def _verify(prober: _Prober, recipe: MergeRecipe, layout: BlockLayout, n: int) -> bool:
    """Step 4: evomerge's merge of a random probe equals sd-mecha's on every key evomerge merges."""
    generator = torch.Generator().manual_seed(1234)
    probes = [{k: torch.randn(_PROBE_WIDTH, generator=generator, dtype=torch.float64) for k in prober.keys} for _ in range(n)]
    theirs = prober.merge(probes)
    owned = [k for k in prober.keys if _owner(layout, k) is not None]
    ours = merge_state_dicts_reference(state_dicts=[{k: p[k] for k in owned} for p in probes], layout=layout, recipe=recipe)
    return all(k in theirs and torch.allclose(ours[k], theirs[k].reshape(ours[k].shape), atol=1e-6) for k in owned)


def _parent_path(given: str, *, recipe_dir: Path, parents_dir: Path | None, index: int) -> Path:
    path = Path(given)
    candidates = [parents_dir / path.name] if parents_dir is not None else []
    candidates += [path] if path.is_absolute() else [recipe_dir / path, path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    where = f"{parents_dir} holds no {path.name}" if parents_dir is not None else f"no file at {candidates[0]}"
    raise _fail(f"parent {index} ({given}): {where}; give --parents DIR, a folder holding a file of that name")


def _recipe_of(prober: _Prober, layout: BlockLayout, n: int, source: Path) -> MergeRecipe:
    weights = _weights(prober, n)
    candidates = _candidates(weights, n)
    if not candidates:
        raise _fail(f"{source}: the models' weights fit no evomerge method (weighted_sum of 2, add_difference of 3, n_average of 2-5)")
    problem = None
    for method, alphas in candidates:
        if method == "n_average":
            components = [w for k, w in weights.items() if (o := _owner(layout, k)) is not None and o in layout.components]
            recipe = MergeRecipe(method="n_average", params={}, seed=0,
                                 merge_vae=any(abs(w[0] - 1.0 / n) <= _TOLERANCE for w in components))
        else:
            try:
                alpha, merge_vae = block_params(alphas, layout=layout)
            except ExportError as exc:
                problem = exc
                continue
            recipe = MergeRecipe(method=method, params={"alpha": alpha}, seed=0, merge_vae=merge_vae)
        if _verify(prober, recipe, layout, n):
            return recipe
    if problem is not None:
        raise problem
    raise _fail(f"{source}: sd-mecha's merge of a random probe is not evomerge's {candidates[0][0]} (no evomerge method computes it)")


def import_mecha(path: str | os.PathLike[str], *, parents_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The evomerge recipe document of the sd-mecha recipe at ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise _fail(f"no recipe file at {path}")
    if parents_dir is not None and not Path(parents_dir).is_dir():
        raise _fail(f"--parents {parents_dir}: no such folder")
    try:
        import sd_mecha
    except ImportError:
        raise _fail("reading .mecha files needs sd-mecha: pip install 'evomerge[mecha]'") from None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        sd_mecha.deserialize(lines)
    except Exception as exc:  # noqa: BLE001 - sd-mecha raises many types for a bad file; one line names it
        raise _fail(f"{path}: sd-mecha cannot read it: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    models = [(i, json.loads(f'"{m.group(2)}"')) for i, line in enumerate(lines) if (m := _MODEL_LINE.match(line))]
    configs = sorted({c.group(1) if (c := _CONFIG.search(lines[i])) else "?" for i, _ in models})
    by_config = {v: k for k, v in MODEL_CONFIGS.items()}
    if not models:
        raise _fail(f"{path}: the recipe names no model")
    if len(configs) != 1 or configs[0] not in by_config:
        raise _fail(f"{path}: the models' configs are {', '.join(configs)}; imported: {', '.join(by_config)}")
    layout = load_layout(by_config[configs[0]])
    n = len(models)
    parents = [_parent_path(given, recipe_dir=path.parent, parents_dir=Path(parents_dir) if parents_dir else None, index=i)
               for i, (_, given) in enumerate(models)]
    with tempfile.TemporaryDirectory() as scratch:
        prober = _Prober(lines, models, configs[0], Path(scratch))
        try:
            recipe = _recipe_of(prober, layout, n, path)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - sd-mecha could not merge the recipe over the probes
            raise _fail(f"{path}: sd-mecha cannot merge it: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    from optimizer.checkpoint.hashing import sha256_file

    return {
        "evomerge_recipe": 1, "study": f"mecha:{path.name}", "trial": None, "values": {},
        "architecture": layout.name,
        "parents": [{"path": str(p), "sha256": sha256_file(p)} for p in parents],
        "recipe": recipe.model_dump(mode="json"),
        "mbw": {p: recipe.to_mbw(layout=layout, param=p) for p in recipe.params},
        "source": {"mecha": str(path.resolve())},
    }
