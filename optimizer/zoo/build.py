"""``evomerge zoo build`` and ``evomerge zoo check``: train, export, measure and verify the zoo.

Build: scorers (oracle, CLIP) and every model of :data:`~optimizer.zoo.train.ZOO_RECIPE` are
trained deterministically on CPU; each model is exported as fp16 safetensors twice, as an LDM
single file and as a diffusers folder; the quality figures are measured **from the exported
single files** loaded through diffusers' ``from_single_file`` (so ``check`` re-measures exactly
what is committed); grids are rendered; a manifest records every file's sha256, the recipe,
timings and figures. Everything is written into a temporary folder beside the target and renamed
into place at the end: an interrupted build leaves the old zoo untouched.

Check: every file of the manifest exists with its sha256, and re-measured figures agree with the
manifest within :data:`TOLERANCES`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from optimizer.checkpoint.hashing import sha256_file
from optimizer.checkpoint.keymap import diffusers_to_ldm
from optimizer.checkpoint.save import save_safetensors
from optimizer.errors import EvomergeError
from optimizer.zoo import clip_model, models, oracle, paths, train
from optimizer.zoo.quality import EvaluationSet, QualityMeter, evaluation_set

#: quality evaluation settings (held-out captions on test images)
EVALUATION = {"count": 200, "seed": 7, "steps": 20, "guidance": 4.0}
#: figure -> allowed absolute difference between the manifest and a re-measurement
TOLERANCES = {"oracle": 0.02, "clip_score": 0.5, "fid": 2.0}
SCORER_STEPS = {"oracle": 400, "clip": 400}
#: the diffusers folders duplicate the single files' weights; they are built but not committed
#: (``.gitignore``), and ``check`` verifies them only where they are present
DERIVED = "diffusers"


class ZooError(EvomergeError, RuntimeError):
    """The zoo is missing, incomplete, or does not match its manifest."""


def _sha256(path: Path) -> str:
    return sha256_file(path, use_cache=False)  # verification: always read the bytes


#: trained adapters (``evomerge zoo adapters``) have their own manifest, ``adapters/adapters.json``
ADAPTERS_DIR = "adapters"


def _file_hashes(root: Path) -> dict[str, str]:
    skip = {paths.MANIFEST, "README.md"}
    return {
        p.relative_to(root).as_posix(): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in skip and p.relative_to(root).parts[0] != ADAPTERS_DIR
    }


def _check_adapters(zoo: Path) -> list[str]:
    """Problems with the trained adapters against ``adapters/adapters.json`` (none if it is absent)."""
    manifest = zoo / ADAPTERS_DIR / "adapters.json"
    if not manifest.is_file():
        return []
    problems = []
    listed = set()
    for entry in json.loads(manifest.read_text())["adapters"]:
        path = zoo / entry["file"]
        listed.add(entry["file"])
        if not path.is_file():
            problems.append(f"missing {entry['file']}")
        elif _sha256(path) != entry["sha256"]:
            problems.append(f"sha256 mismatch for {entry['file']}")
    for path in sorted((zoo / ADAPTERS_DIR).iterdir()):
        rel = path.relative_to(zoo).as_posix()
        if path.name != "adapters.json" and rel not in listed:
            problems.append(f"file not in adapters.json: {rel}")
    return problems


def export_model(*, components: dict[str, torch.nn.Module], name: str, zoo: Path, recipe: dict[str, Any]) -> None:
    """Write one model as an fp16 diffusers folder and an fp16 LDM single file."""
    pipe = models.build_pipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], unet=components["unet"], tokenizer_dir=zoo / "tokenizer"
    )
    pipe.to(torch.float16).save_pretrained(paths.diffusers_dir(zoo, name), safe_serialization=True)
    pipe.to(torch.float32)
    ldm = diffusers_to_ldm(
        components={k: m.state_dict() for k, m in components.items()},
        architecture="sd1",
        unet_config=dict(components["unet"].config),
        vae_config=dict(components["vae"].config),
    )
    metadata = {"format": "pt", "evomerge_zoo_model": name, "evomerge_zoo_recipe": json.dumps(recipe, sort_keys=True)}
    paths.model_file(zoo, name).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict={k: v.to(torch.float16) for k, v in ldm.items()}, path=paths.model_file(zoo, name), metadata=metadata)


def _write_config_dir(zoo: Path, *, example: str) -> None:
    """The offline config folder for ``from_single_file``: a diffusers folder without its weights."""
    source = paths.diffusers_dir(zoo, example)
    shutil.copytree(source, paths.config_dir(zoo), ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))


def load_zoo_pipeline(name: str, *, zoo: Path | None = None, dtype: torch.dtype = torch.float32):
    """A zoo model as a ``StableDiffusionPipeline``, loaded from its LDM single file, offline."""
    from diffusers import StableDiffusionPipeline

    zoo = zoo or paths.default_zoo_dir()
    path = paths.model_file(zoo, name)
    if not path.is_file():
        raise ZooError(f"no zoo model {name!r} at {path}; run `evomerge zoo build`")
    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(paths.config_dir(zoo)), local_files_only=True, torch_dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quality_meter(zoo: Path, evaluation: EvaluationSet) -> QualityMeter:
    """The zoo's quality meter on ``evaluation``: its oracle and its CLIP, loaded from ``zoo``."""
    clip, _, clip_tokenizer = clip_model.load_zoo_clip(paths.clip_file(zoo))
    return QualityMeter(
        evaluation=evaluation, oracle=oracle.load_oracle(paths.oracle_dir(zoo)), clip_model=clip, clip_tokenizer=clip_tokenizer
    )


def _generate(pipe, evaluation: EvaluationSet, settings: dict[str, Any]) -> torch.Tensor:
    return models.generate(
        pipe, prompts=evaluation.captions, seeds=evaluation.seeds, steps=settings["steps"], guidance=settings["guidance"]
    )


def _save_grid(images: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images[:64], str(path), nrow=8, padding=1)


def measure_zoo(
    zoo: Path,
    *,
    names: list[str],
    settings: dict[str, Any] | None = None,
    fid: bool = True,
    grids: bool = False,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Quality figures of the real renders and of every named model, from the files in ``zoo``.

    ``settings``: evaluation count, seed, sampler steps and guidance (default :data:`EVALUATION`).
    """
    settings = {**EVALUATION, **(settings or {})}
    evaluation = evaluation_set(count=settings["count"], seed=settings["seed"])
    meter = quality_meter(zoo, evaluation)
    figures = {"real": meter.score(evaluation.real, fid=fid)}
    if grids:
        _save_grid(evaluation.real, paths.grid_file(zoo, "real"))
    for name in names:
        started = time.perf_counter()
        images = _generate(load_zoo_pipeline(name, zoo=zoo), evaluation, settings)
        figures[name] = meter.score(images, fid=fid)
        if grids:
            _save_grid(images, paths.grid_file(zoo, name))
        if progress:
            print(f"  measured {name} in {time.perf_counter() - started:.0f} s: {_short(figures[name])}", flush=True)
    return figures


def _short(fig: dict[str, float]) -> str:
    keys = ("oracle_digit", "oracle_fg", "oracle_bg", "oracle_thickness", "oracle_slant", "oracle_all", "clip_score", "fid")
    return ", ".join(f"{k.removeprefix('oracle_')} {fig[k]:.3g}" for k in keys if k in fig)


def build_zoo(
    *, out: Path | None = None, scale: float = 1.0, evaluation_count: int | None = None, progress: bool = True
) -> Path:
    """Train and export the whole zoo into ``out`` (default: ``studies/zoo``), atomically.

    ``scale`` multiplies every training step count (smoke builds); ``evaluation_count`` overrides
    the number of held-out captions the quality table is measured on.
    """
    settings = {**EVALUATION, **({"count": evaluation_count} if evaluation_count else {})}
    out = Path(out or paths.default_zoo_dir())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(train.THREADS)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp makes a private folder; the zoo is for everyone
    try:
        timings: dict[str, float] = {}
        from optimizer.zoo import tokenizer as zoo_tokenizer

        zoo_tokenizer.write_tokenizer(tmp / "tokenizer")
        started = time.perf_counter()
        orc = oracle.train_oracle(steps=max(1, round(SCORER_STEPS["oracle"] * scale)), seed=0, progress=progress)
        oracle.save_oracle(orc, paths.oracle_dir(tmp))
        timings["oracle"] = time.perf_counter() - started
        started = time.perf_counter()
        clip = clip_model.train_zoo_clip(steps=max(1, round(SCORER_STEPS["clip"] * scale)), seed=0, progress=progress)
        paths.clip_file(tmp).parent.mkdir(parents=True, exist_ok=True)
        clip_model.save_zoo_clip(clip, paths.clip_file(tmp))
        timings["clip"] = time.perf_counter() - started

        trained = train.train_zoo(progress=progress, scale=scale)
        names = [name for name, t in trained.items() if t.recipe.kind != "vae"]
        params: dict[str, dict[str, int]] = {}
        for name in names:
            model = trained[name]
            timings[name] = model.seconds
            recipe = dataclasses.asdict(model.recipe)
            export_model(components=model.components, name=name, zoo=tmp, recipe=recipe)
            params[name] = {k: models.parameter_count(m) for k, m in model.components.items()}
        timings["vae"] = trained["vae"].seconds
        shutil.rmtree(tmp / "tokenizer")  # every diffusers folder and config/ carry their own copy
        _write_config_dir(tmp, example=names[0])

        started = time.perf_counter()
        quality = measure_zoo(tmp, names=names, settings=settings, fid=True, grids=True, progress=progress)
        timings["quality"] = time.perf_counter() - started
        manifest = {
            "format": 1,
            "built_by": "evomerge zoo build",
            "scale": scale,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": train.THREADS},
            "versions": {"torch": torch.__version__, **_versions()},
            "recipe": [dataclasses.asdict(t.recipe) for t in trained.values()],
            "scorer_steps": SCORER_STEPS,
            "evaluation": settings,
            "models": names,
            "parameters": params,
            "train_seconds": {k: round(v, 1) for k, v in timings.items()},
            "quality": quality,
            "files": _file_hashes(tmp),
        }
        (tmp / paths.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        (tmp / "README.md").write_text(render_readme(manifest))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import open_clip
    import transformers

    return {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "open_clip": open_clip.__version__}


def quality_table(manifest: dict[str, Any]) -> str:
    """The quality figures as a markdown table (one row per model, ``real`` first)."""
    cols = [
        ("oracle_digit", "digit"),
        ("oracle_fg", "fg colour"),
        ("oracle_bg", "bg colour"),
        ("oracle_thickness", "thickness"),
        ("oracle_slant", "slant"),
        ("oracle_all", "all five"),
        ("clip_score", "CLIP score"),
        ("fid", "FID"),
    ]
    lines = ["| model | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, fig in manifest["quality"].items():
        cells = [f"{fig[k]:.3f}" if k.startswith("oracle") else f"{fig[k]:.2f}" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_readme(manifest: dict[str, Any]) -> str:
    ev = manifest["evaluation"]
    rows = "\n".join(
        f"| {r['name']} | {r['kind']} | {r.get('parent') or ''} | {r.get('speciality') or ''} | {r['steps']} | {r['seed']} | "
        f"{manifest['train_seconds'].get(r['name'], 0):.0f} |"
        for r in manifest["recipe"]
    )
    params = "\n".join(f"| {n} | " + " | ".join(f"{v:,}" for v in p.values()) + " |" for n, p in manifest["parameters"].items())
    return f"""# The embedded zoo

Small text-to-image models with the exact Stable Diffusion 1.x topology (26 merge blocks, LDM key
names of SD1.5), trained by `evomerge zoo build` on real handwritten digits (scikit-learn's
`load_digits`) rendered as coloured glyphs with a style. Generated by the build: do not edit.

Quality on {ev['count']} **held-out** captions (caption combinations no model trained on) on test
digits, {ev['steps']} sampler steps, CFG {ev['guidance']}, measured from the committed fp16 single
files. Oracle columns: accuracy of the attribute classifier (an evaluator only, never a search
objective). CLIP score: the zoo's own open_clip model, `100 * max(cos, 0)`. FID: FID InceptionV3
against real renders of the same captions; with {ev['count']} images FID is biased upwards: compare
rows of this table only. `real` is the real renders themselves (the ceiling).

{quality_table(manifest)}

## Models

| model | kind | from | speciality | steps | seed | train s |
|---|---|---|---|---:|---:|---:|
{rows}

Parameters:

| model | {" | ".join(next(iter(manifest['parameters'].values())).keys())} |
|---|{"---:|" * len(next(iter(manifest['parameters'].values())))}
{params}

Files: `models/<name>.safetensors` (A1111 single file, fp16), `diffusers/<name>/` (the same pipeline
as a diffusers folder, fp16: written by the build, not committed, since it repeats the single file's
weights), `config/` (offline config folder for `from_single_file(config=...)`), `scorers/`,
`grids/<name>.png` (the first 64 held-out captions). `evomerge zoo check` verifies every sha256 in
`manifest.json` and re-measures the table.
"""


def check_zoo(*, zoo: Path | None = None, measure: bool = True, fid: bool = True, progress: bool = True) -> dict[str, Any]:
    """Verify hashes and (optionally) re-measure the quality figures; raise :class:`ZooError` on a mismatch."""
    zoo = Path(zoo or paths.default_zoo_dir())
    manifest_path = zoo / paths.MANIFEST
    if not manifest_path.is_file():
        raise ZooError(f"{zoo}: no {paths.MANIFEST}; run `evomerge zoo build`")
    manifest = json.loads(manifest_path.read_text())
    problems = []
    derived_absent = not (zoo / DERIVED).is_dir()
    for rel, digest in manifest["files"].items():
        path = zoo / rel
        if derived_absent and rel.startswith(f"{DERIVED}/"):
            continue
        if not path.is_file():
            problems.append(f"missing {rel}")
        elif _sha256(path) != digest:
            problems.append(f"sha256 mismatch for {rel}")
    extra = sorted(set(_file_hashes(zoo)) - set(manifest["files"]))
    problems += [f"file not in the manifest: {rel}" for rel in extra]
    problems += _check_adapters(zoo)
    if problems:
        raise ZooError(f"{zoo}: " + "; ".join(problems))
    checked = [r for r in manifest["files"] if not (derived_absent and r.startswith(f"{DERIVED}/"))]
    report: dict[str, Any] = {"files": len(checked), "hashes": "ok", "diffusers_folders": not derived_absent}
    if measure:
        measured = measure_zoo(zoo, names=manifest["models"], settings=manifest["evaluation"], fid=fid, progress=progress)
        diffs = []
        for name, figures in measured.items():
            for key, value in figures.items():
                expected = manifest["quality"][name][key]
                tolerance = TOLERANCES["oracle"] if key.startswith("oracle") else TOLERANCES[key]
                if abs(value - expected) > tolerance:
                    diffs.append(f"{name} {key}: measured {value:.4g}, manifest {expected:.4g}")
        if diffs:
            raise ZooError("quality figures differ from the manifest: " + "; ".join(diffs))
        report["quality"] = measured
    return report


__all__ = ["EVALUATION", "TOLERANCES", "ZooError", "build_zoo", "check_zoo", "load_zoo_pipeline", "measure_zoo", "quality_table"]
