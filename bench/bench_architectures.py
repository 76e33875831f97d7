"""Per-trial cost of a study on full-size SDXL (and Flux.1) parents: merge, render, score seconds and
peak memory, measured on one machine in one run.

Parents are random-init models of the real configs (the shipped offline config folders), built on
the device and written as single files, so nothing is downloaded. Scoring uses the zoo CLIP (no
real CLIP weights exist offline; the score is meaningless here, only its cost is measured). Each
architecture runs ``--trials`` trials of ``--prompts`` images at its native resolution.

    python bench/bench_architectures.py                 # SDXL at 1024x1024 (needs a GPU)
    python bench/bench_architectures.py --flux          # + Flux.1-dev (two bf16 parents: ~75 GB of GPU memory)
    python bench/bench_architectures.py --tiny          # tiny-width models: checks the script on a CPU

Writes ``bench/results/architectures-<host>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

try:
    from _common import machine_info, result_path, write_json
except ImportError:  # python -m bench.bench_architectures
    from ._common import machine_info, result_path, write_json


def _full_components(architecture: str, *, device: str, dtype, seed: int) -> dict:
    """Random-init modules of the shipped config, built directly on ``device`` in ``dtype``."""
    import torch

    from optimizer.architectures.layout import load_layout
    from optimizer.checkpoint.config_dir import diffusers_config_dir
    from optimizer.checkpoint.convert import _class

    layout = load_layout(architecture)
    folder = diffusers_config_dir(layout.spec.diffusers_config)
    index = json.loads((folder / "model_index.json").read_text())
    torch.manual_seed(seed)
    modules = {}
    for name, (library, cls_name) in index.items():
        if name.startswith("_") or library not in ("diffusers", "transformers") or "tokenizer" in name or name == "scheduler":
            continue
        config = json.loads((folder / name / "config.json").read_text())
        cls = _class(f"{library}.{cls_name}")
        with torch.device(device):
            if library == "transformers":
                model = cls(cls.config_class.from_dict({k: v for k, v in config.items() if not k.startswith("_")}))
            else:
                model = cls.from_config(config)
        modules[name] = model.to(dtype).eval()
    return modules


def _write_parent(path: Path, components: dict, architecture: str) -> Path:
    from safetensors.torch import save_file

    if architecture in ("sd1", "sd2", "sdxl"):
        from optimizer.testing.tiny_models import tiny_ldm_state_dict

        state = tiny_ldm_state_dict(components, architecture)
    else:
        from optimizer.architectures.layout import load_layout
        from optimizer.checkpoint.convert import from_diffusers

        state = from_diffusers(modules={n: m.state_dict() for n, m in components.items()}, layout=load_layout(architecture),
                               configs={n: dict(m.config) for n, m in components.items() if n == "vae"})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path


def _config_dir(architecture: str, components: dict, *, tiny: bool) -> Path:
    from optimizer.architectures.layout import load_layout
    from optimizer.checkpoint.config_dir import diffusers_config_dir
    from optimizer.testing.tiny_dit import t5_tokenizer_json, tiny_dit_config_dir
    from optimizer.testing.tiny_models import tiny_config_dir

    if tiny:
        return tiny_config_dir(components, architecture) if architecture == "sdxl" else tiny_dit_config_dir(components, "flux-dev")
    name = load_layout(architecture).spec.diffusers_config
    if architecture != "flux":
        return diffusers_config_dir(name)
    # no T5 tokenizer ships offline: a small stand-in (ids < 64) is enough to time the pipeline
    config = '{"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "extra_ids": 0}'
    return diffusers_config_dir(name, extra_files={"tokenizer_2/tokenizer.json": t5_tokenizer_json(), "tokenizer_2/tokenizer_config.json": config})


def run(architecture: str, *, tiny: bool, trials: int, prompts: int, steps: int, root: Path) -> dict:
    import optuna
    import torch
    import yaml

    from optimizer.study.config import load_study_config
    from optimizer.study.loop import run_study
    from optimizer.study.runner import StudyRunner
    from optimizer.study.storage import StudyFolder
    from optimizer.zoo.prompts import zoo_prompt_set_data

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else (torch.bfloat16 if architecture == "flux" else torch.float16)
    started = time.perf_counter()
    files = []
    for seed in (0, 1):
        if tiny:
            from optimizer.testing.tiny_dit import tiny_dit_components
            from optimizer.testing.tiny_models import tiny_sdxl_components

            components = tiny_sdxl_components(seed) if architecture == "sdxl" else tiny_dit_components("flux-dev", seed)
        else:
            components = _full_components(architecture, device=device, dtype=dtype, seed=seed)
        files.append(_write_parent(root / f"{architecture}-{seed}.safetensors", components, architecture))
        config_dir = _config_dir(architecture, components, tiny=tiny)
        del components
        if device == "cuda":
            torch.cuda.empty_cache()
    build_s = time.perf_counter() - started
    size = 32 if tiny else 1024
    data = zoo_prompt_set_data()
    data.update(search=data["search"][:prompts], held_out=data["held_out"][:2], steps=steps, width=size, height=size, scheduler=None)
    (root / "prompts.yaml").write_text(yaml.safe_dump(data))
    study = {
        "name": f"bench-{architecture}", "parents": [str(f) for f in files], "config_dir": str(config_dir),
        "dtype": {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
        "search_space": {"alpha": {"low": 0.0, "high": 1.0}}, "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"}, "objectives": ["clip"], "prompts": "prompts.yaml",
        "render": {"batch_size": "auto", "grid_images": 2}, "budget": {"trials": trials},
    }
    (root / "study.yaml").write_text(yaml.safe_dump(study))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = load_study_config(root / "study.yaml")
    folder = StudyFolder(root / f"run-{architecture}")
    t0 = time.perf_counter()
    study_runner = StudyRunner(config, folder=folder)
    setup_s = time.perf_counter() - t0
    run_study(config, folder=folder, runner=study_runner, progress=False)
    loaded = optuna.load_study(study_name=config.name, storage=folder.storage_url(config))
    per_trial = [dict(t.user_attrs.get("seconds", {}), number=t.number) for t in loaded.trials]
    bank = study_runner.parents.bank
    return {
        "architecture": architecture, "tiny": tiny, "device": device, "dtype": str(dtype), "image_size": size,
        "images_per_trial": prompts, "steps": steps, "parameters_per_parent": bank.numel,
        "bank_bytes": bank.numel * bank.buffers[0].element_size() * (bank.n_parents + 1),
        "build_parents_s": build_s, "setup_s": setup_s, "trials": per_trial,
        "peak_device_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny-width models (a CPU check of the script)")
    parser.add_argument("--flux", action="store_true", help="also Flux.1-dev (needs ~75 GB of GPU memory)")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    for architecture in ("sdxl", *(("flux",) if args.flux else ())):
        with tempfile.TemporaryDirectory(prefix=f"bench-{architecture}-") as tmp:
            results.append(run(architecture, tiny=args.tiny, trials=args.trials, prompts=args.prompts, steps=args.steps, root=Path(tmp)))
        print(json.dumps(results[-1], indent=1), flush=True)
    out = args.out or result_path("architectures" + ("-tiny" if args.tiny else ""))
    write_json(out, {"machine": machine_info(), "results": results})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
