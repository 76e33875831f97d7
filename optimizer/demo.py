"""``make demo``: a merge job end to end on the embedded zoo (CPU, about 2 minutes).

Until the study runner exists (it will replace this with a real Optuna study), the demo shows what a
study trial does, on the committed zoo (``studies/zoo``): two specialists of the same base are loaded
once into the merge kernel, candidate recipes are rebuilt in place (timed), a few recipes are
rendered on held-out captions and scored with the zoo's CLIP and its oracle, and the best one is
saved as an A1111 single file with its merge metadata, loaded back by diffusers' ``from_single_file``
(offline) and rendered as an image grid.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from optimizer.architectures import format_mbw
from optimizer.checkpoint.keymap import ldm_to_diffusers
from optimizer.checkpoint.load import load_checkpoint
from optimizer.merge import Merger, MergeRecipe
from optimizer.merge_files import load_parents, merge_to_file
from optimizer.zoo import paths
from optimizer.zoo.build import EVALUATION, ZooError, _meter, load_zoo_pipeline
from optimizer.zoo.models import generate
from optimizer.zoo.quality import evaluation_set

OUT = Path("out/demo")
PARENTS = ("shape", "colour")
#: held-out captions rendered per candidate (the zoo's own table uses 200)
COUNT = 64


def _candidates(layout) -> dict[str, MergeRecipe]:
    """Recipes to compare: each parent, the plain 50/50 Checkpoint Merger, and two block recipes."""
    uniform = lambda a: MergeRecipe.uniform(method="weighted_sum", layout=layout, alpha=a)  # noqa: E731
    # alpha is the weight of the second parent (colour): shapes from the first, colours from the second
    return {
        "shape (alpha 0)": uniform(0.0),
        "colour (alpha 1)": uniform(1.0),
        "weighted sum 0.5": uniform(0.5),
        "MBW in:shape out:colour": MergeRecipe.from_mbw(
            method="weighted_sum", layout=layout, mbw="0.5,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1"
        ),
        "MBW in:colour out:shape": MergeRecipe.from_mbw(
            method="weighted_sum", layout=layout, mbw="0.5,1,1,1,1,1,1,1,1,1,1,1,1,0.5,0,0,0,0,0,0,0,0,0,0,0,0"
        ),
    }


def main() -> None:
    zoo = paths.default_zoo_dir()
    if not (zoo / paths.MANIFEST).is_file():
        raise SystemExit(f"no zoo at {zoo}: run `evomerge zoo build` first")
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    files = [paths.model_file(zoo, name) for name in PARENTS]
    parents = load_parents(paths=files, device="auto")
    layout = parents.bank.layout
    merger = Merger(parents.bank)
    print(f"parents: {', '.join(map(str, files))} ({parents.bank})")

    rng = random.Random(0)
    timings = []
    for _ in range(50):
        merger.merge(MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw=[rng.random() for _ in layout.blocks]))
    for _ in range(50):
        stats = merger.merge(MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw=[rng.random() for _ in layout.blocks]))
        timings.append(stats.seconds)
    timings.sort()
    print(f"50 candidate merges in place on {parents.bank.device} ({merger.backend}): median {timings[25] * 1e3:.2f} ms, no disk I/O")

    # one pipeline whose UNet and text encoder are refilled from the merge buffer per candidate
    pipe = load_zoo_pipeline(PARENTS[0], zoo=zoo)
    evaluation = evaluation_set(count=COUNT, seed=EVALUATION["seed"])
    meter = _meter(zoo, evaluation)
    config = paths.config_dir(zoo)
    rows: dict[str, dict[str, float]] = {}
    for label, recipe in _candidates(layout).items():
        started = time.perf_counter()
        merger.merge(recipe)
        weights = ldm_to_diffusers(state_dict=merger.state_dict(), architecture="sd1", config_dir=config)
        pipe.unet.load_state_dict(weights["unet"])
        pipe.text_encoder.load_state_dict(weights["text_encoder"], strict=False)
        images = generate(pipe, prompts=evaluation.captions, seeds=evaluation.seeds, steps=EVALUATION["steps"], guidance=EVALUATION["guidance"])
        rows[label] = meter.score(images, fid=False)
        rows[label]["seconds"] = time.perf_counter() - started
    print(f"\n{COUNT} held-out captions per candidate (oracle accuracy, zoo CLIP score):")
    print(f"  {'candidate':26s} {'digit':>6s} {'fg':>6s} {'bg':>6s} {'all':>6s} {'CLIP':>6s} {'s':>5s}")
    for label, r in rows.items():
        print(
            f"  {label:26s} {r['oracle_digit']:6.3f} {r['oracle_fg']:6.3f} {r['oracle_bg']:6.3f} "
            f"{r['oracle_all']:6.3f} {r['clip_score']:6.2f} {r['seconds']:5.1f}"
        )

    best = max(rows, key=lambda k: rows[k]["clip_score"])  # the search objective is CLIP; the oracle only reports
    recipe = _candidates(layout)[best]
    merged = merge_to_file(parents=parents, recipe=recipe, output=OUT / "merged.safetensors", overwrite=True)
    meta = load_checkpoint(merged).metadata
    print(f"\nbest by CLIP score: {best}; saved {merged} (MBW {format_mbw(recipe.params['alpha'], layout=layout)})")
    print(f"  sd_merge_recipe parents: {[p['short_hash'] for p in json.loads(meta['sd_merge_recipe'])['parents']]}")

    from diffusers import StableDiffusionPipeline
    from torchvision.utils import save_image

    loaded = StableDiffusionPipeline.from_single_file(str(merged), config=str(config), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    images = generate(loaded, prompts=evaluation.captions[:32], seeds=evaluation.seeds[:32], steps=EVALUATION["steps"], guidance=EVALUATION["guidance"])
    save_image(images, str(OUT / "merged_grid.png"), nrow=8, padding=1)
    (OUT / "captions.txt").write_text("\n".join(evaluation.captions[:32]) + "\n")
    print(f"rendered {OUT / 'merged_grid.png'} (captions in {OUT / 'captions.txt'}) from the saved file via from_single_file")
    print("next: `evomerge inspect out/demo/merged.safetensors`, or `evomerge merge A B --mbw ... -o out.safetensors`")


if __name__ == "__main__":
    try:
        main()
    except ZooError as exc:
        raise SystemExit(str(exc)) from None
