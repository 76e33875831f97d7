#!/usr/bin/env python
"""Benchmark: what scoring costs next to rendering, and what TAESD decoding saves (not a test).

Every figure is measured side by side in one run, and the results are ratios:

1. ``zoo`` (always): the embedded zoo's base model renders the zoo prompt set's search prompts
   (48 images, 20 DPM-Solver++ steps, CFG 4, 32x32) with :class:`optimizer.render.Renderer`; then
   each objective scores the same images (``reset`` + ``update`` + ``compute``; reference features
   are computed before the clock starts, as a study does once): the zoo CLIP score, FID and KID on
   the FID InceptionV3, FID on the zoo CLIP's image features. Reported: seconds and
   ``score / render``.
2. ``sd15`` (``--sd15``): an SD1.5-sized pipeline (the shipped sd15 configs, seeded random weights:
   timing does not depend on the values) renders ``--sd-images`` 512x512 images with
   ``--sd-steps`` steps, once decoding with the full ``AutoencoderKL`` and once with TAESD (real
   weights from ``../shared/assets/taesd``, when present); scored with an open_clip ViT-L-14 (random
   weights, the architecture SD users score with) CLIP score, the improved aesthetic MLP on it (the
   real head when ``../shared`` is present), and FID/KID on InceptionV3 against ImageNet photos.
   Reported: render seconds with each decoder, decoder time share, and ``score / render``.

Results: a table on stdout and ``bench/results/objectives-<hostname>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import socket
from pathlib import Path

if __package__:  # python -m bench.bench_objectives
    from . import _common as common
else:  # python bench/bench_objectives.py
    import _common as common

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SHARED = common.REPO.parent / "shared" / "assets"


def _score(objective, images, prompts) -> float:
    objective.reset()
    objective.update(images, prompts=prompts)
    return objective.compute()


def _score_all(objectives: dict, images, prompts, *, device: torch.device, render_s: float, warmup_images: int) -> dict:
    """Per objective: one untimed warm-up on the first ``warmup_images`` images, then the timed
    score of all of them: ``{name: {"value", "seconds", "share_of_render"}}``."""
    rows = {}
    for name, objective in objectives.items():
        _score(objective, images[:warmup_images], prompts[:warmup_images])  # warm-up
        value, seconds = common.timed(lambda o=objective: _score(o, images, prompts), device=device)
        rows[name] = {"value": value, "seconds": seconds, "share_of_render": seconds / render_s}
    return rows


def bench_zoo(device: torch.device) -> dict:
    from objectives.clip_score import (
        CLIPImageFeatures,
        CLIPScoreObjective,
        load_open_clip,
    )
    from objectives.fid import FIDObjective, KIDObjective, reference_features
    from objectives.inception import InceptionFeatures
    from optimizer.render.prompts import load_prompt_set
    from optimizer.render.renderer import Renderer
    from optimizer.zoo import paths
    from optimizer.zoo.build import EVALUATION, load_zoo_pipeline
    from optimizer.zoo.prompts import ZOO_PROMPTS
    from optimizer.zoo.quality import evaluation_set

    zoo = paths.default_zoo_dir()
    prompt_set = load_prompt_set(ZOO_PROMPTS)
    jobs = prompt_set.jobs("search")
    renderer = Renderer(load_zoo_pipeline("base").to(device), prompt_set=prompt_set)
    renderer.render(jobs[:4])  # warm-up
    images, render_s = common.timed(lambda: renderer.render(jobs), device=device)
    prompts = [j.prompt for j in jobs]

    clip_model, clip_tokenizer = load_open_clip("evomerge-digits-clip", pretrained=paths.clip_file(zoo), device=device)
    real = evaluation_set(count=EVALUATION["count"], seed=EVALUATION["seed"]).real
    inception = InceptionFeatures().to(device)
    clip_features = CLIPImageFeatures(clip_model, name="zoo")
    ref_inception = reference_features(feature=inception, images=real.to(device))
    ref_clip = reference_features(feature=clip_features, images=real.to(device))
    objectives = {
        "clip score (zoo CLIP)": CLIPScoreObjective(model=clip_model, tokenizer=clip_tokenizer),
        "FID (InceptionV3)": FIDObjective(reference=ref_inception, feature=inception),
        "KID (InceptionV3)": KIDObjective(reference=ref_inception, feature=inception),
        "FID (zoo CLIP features)": FIDObjective(reference=ref_clip, feature=clip_features),
    }
    rows = _score_all(objectives, images, prompts, device=device, render_s=render_s, warmup_images=4)
    return {"images": len(jobs), "size": list(renderer.size), "steps": prompt_set.steps, "render_seconds": render_s, "objectives": rows}


def _sd15_pipeline(device: torch.device):
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from optimizer.checkpoint.config_dir import diffusers_config_dir

    folder = Path(diffusers_config_dir("sd15"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device)


def bench_sd15(device: torch.device, *, images: int, steps: int) -> dict:
    import open_clip

    from objectives.aesthetic import AestheticObjective, MLPHead, load_aesthetic_head
    from objectives.clip_score import CLIPScoreObjective
    from objectives.fid import (
        FIDObjective,
        KIDObjective,
        image_files,
        load_images,
        reference_features,
    )
    from objectives.inception import InceptionFeatures
    from optimizer.render.prompts import parse_prompt_set
    from optimizer.render.renderer import Renderer

    prompt_set = parse_prompt_set(
        {"search": [f"a photograph of a landscape, number {i}" for i in range(images)], "steps": steps, "guidance": 7.0, "width": 512, "height": 512}
    )
    jobs = prompt_set.jobs("search")
    pipe = _sd15_pipeline(device)
    renderer = Renderer(pipe, prompt_set=prompt_set, batch_size=images)
    out, render_s = common.timed(lambda: renderer.render(jobs), device=device)
    result: dict = {"images": images, "size": [512, 512], "steps": steps, "render_seconds_vae": render_s}
    latents = torch.randn(images, 4, 64, 64, device=device)
    with torch.no_grad():
        _, decode_s = common.timed(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample, device=device)
    result["decode_seconds_vae"] = decode_s
    taesd_dir = SHARED / "taesd"
    if taesd_dir.is_dir():
        from optimizer.render.taesd import load_taesd, swap_decoder

        tiny = load_taesd(directory=taesd_dir, variant="sd", device=device)
        fast = Renderer(swap_decoder(pipe, tiny), prompt_set=prompt_set, batch_size=images)
        _, fast_s = common.timed(lambda: fast.render(jobs), device=device)
        with torch.no_grad():
            _, tiny_decode_s = common.timed(lambda: tiny.decode(latents).sample, device=device)
        result.update(render_seconds_taesd=fast_s, decode_seconds_taesd=tiny_decode_s, render_vae_over_taesd=render_s / fast_s)
    else:
        result["taesd"] = "skipped: ../shared/assets/taesd is absent"

    model = open_clip.create_model("ViT-L-14", pretrained=None, device=device).eval()
    tokenizer = open_clip.get_tokenizer("ViT-L-14")
    head_file = SHARED / "aesthetic" / "improved-aesthetic-predictor" / "sac+logos+ava1-l14-linearMSE.pth"
    head = load_aesthetic_head(head_file) if head_file.is_file() else MLPHead([768, 1024, 128, 64, 16, 1], relu=False).eval()
    photos = SHARED / "imagenet-sample"
    inception = InceptionFeatures().to(device)
    reference = load_images(image_files(photos)[:50], size=299) if photos.is_dir() else torch.rand(50, 3, 299, 299)
    ref = reference_features(feature=inception, images=reference.to(device))
    prompts = [j.prompt for j in jobs]
    objectives = {
        "clip score (ViT-L-14)": CLIPScoreObjective(model=model, tokenizer=tokenizer),
        "aesthetic (ViT-L-14 + MLP)": AestheticObjective(clip_model=model, head=head),
        "FID (InceptionV3)": FIDObjective(reference=ref, feature=inception),
        "KID (InceptionV3)": KIDObjective(reference=ref, feature=inception),
    }
    result["objectives"] = _score_all(objectives, out, prompts, device=device, render_s=render_s, warmup_images=2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sd15", action="store_true", help="also measure an SD1.5-sized pipeline at 512x512")
    parser.add_argument("--sd-images", type=int, default=2)
    parser.add_argument("--sd-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    report = {
        "host": socket.gethostname(),
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "zoo": bench_zoo(device),
    }
    if args.sd15:
        report["sd15"] = bench_sd15(device, images=args.sd_images, steps=args.sd_steps)
    for part in ("zoo", "sd15"):
        if part not in report:
            continue
        r = report[part]
        render = r.get("render_seconds", r.get("render_seconds_vae"))
        print(f"\n{part}: {r['images']} images {r['size'][0]}x{r['size'][1]}, {r['steps']} steps: render {render:.2f} s")
        if "render_seconds_taesd" in r:
            print(f"  with TAESD: {r['render_seconds_taesd']:.2f} s (full VAE / TAESD = {r['render_vae_over_taesd']:.2f}x); "
                  f"decode {r['decode_seconds_vae']:.2f} s vs {r['decode_seconds_taesd']:.3f} s")
        print(f"  {'objective':28s} {'seconds':>8s} {'/ render':>9s} {'value':>10s}")
        for name, row in r["objectives"].items():
            print(f"  {name:28s} {row['seconds']:8.3f} {row['share_of_render']:9.3f} {row['value']:10.4f}")
    out = common.write_json(args.out or common.result_path("objectives", date=report["date"]), report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
