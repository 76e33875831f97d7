"""``make demo``: the merge job end to end on tiny, real-topology SD1 checkpoints (CPU, ~1 minute).

Until the study runner and the embedded zoo exist, the demo shows the foundation a study stands
on: parents written as A1111 single files, inspected, loaded once into the merge kernel, many
candidate recipes rebuilt in place (timed), the chosen one saved with its merge metadata, and the
saved file loaded back by diffusers' ``from_single_file`` (offline) to render an image.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from optimizer.architectures import format_mbw
from optimizer.describe import describe_checkpoint
from optimizer.checkpoint.load import load_checkpoint
from optimizer.merge import Merger, MergeRecipe
from optimizer.merge_files import load_parents, merge_to_file
from optimizer.tiny_models import tiny_config_dir, tiny_sd1_components, write_tiny_ldm

OUT = Path("out/demo")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    components = [tiny_sd1_components(seed=s) for s in (0, 1)]
    paths = [write_tiny_ldm(OUT / f"parent{s}.safetensors", c, "sd1") for s, c in enumerate(components)]
    config = tiny_config_dir(components[0], "sd1")
    info = describe_checkpoint(load_checkpoint(paths[0]))
    print(f"parents: {', '.join(map(str, paths))}")
    print(f"  architecture {info['architecture']}, {info['tensors']} tensors, {info['parameters']:,} parameters, sha256 {info['short_hash']}")

    parents = load_parents(paths=paths, device="auto")
    layout = parents.bank.layout
    merger = Merger(parents.bank)
    rng = random.Random(0)
    timings = []
    for _ in range(20):
        recipe = MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw=[rng.random() for _ in layout.blocks])
        started = time.perf_counter()
        merger.merge(recipe)
        timings.append(time.perf_counter() - started)
    timings.sort()
    print(f"20 candidate merges in place on {parents.bank.device}: median {timings[10] * 1e3:.2f} ms per merge, no disk I/O")

    recipe = MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw="0.5,1,1,1,1,1,1,1,1,1,1,1,1,0.5,0,0,0,0,0,0,0,0,0,0,0,0")
    merged = merge_to_file(parents=parents, recipe=recipe, output=OUT / "merged.safetensors", overwrite=True)
    meta = load_checkpoint(merged).metadata
    print(f"merged: {merged}  (MBW {format_mbw(recipe.params['alpha'], layout=layout)})")
    print(f"  sd_merge_recipe parents: {[p['short_hash'] for p in json.loads(meta['sd_merge_recipe'])['parents']]}")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(merged), config=str(config), local_files_only=True)
    image = pipe(
        "a red digit 7 on a black background",
        num_inference_steps=4,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    image.save(OUT / "merged.png")
    print(f"rendered {OUT / 'merged.png'} with the merged checkpoint loaded by diffusers' from_single_file")
    print("next: `evomerge inspect out/demo/merged.safetensors`, or merge your own: `evomerge merge A B --mbw ... -o out.safetensors`")


if __name__ == "__main__":
    main()
