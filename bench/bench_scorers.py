#!/usr/bin/env python
"""Benchmark: seconds per image of every registered scorer (not a test).

Each scorer of the registry is built from the test suite's tiny random configs of its real
architecture (``tests/tiny_scorers.py``; timing does not depend on the weights' values) and scores
the same ``--images`` 32x32 images ``--reps`` times after one warm-up pass; reported: the median
seconds per image and the ratio to the zoo CLIP score's, measured side by side in one run.
``--real-size`` also builds the real architectures with seeded random weights (open_clip ViT-H-14
for HPSv2.1, a CLIP-H ``CLIPModel`` for PickScore, SigLIP so400m-patch14-384 for aesthetic v2.5,
open_clip ViT-L-14 for CLIP score and the LAION head, BLIP ViT-L/16 + BERT-base for ImageReward)
and scores 512x512 images: what a user pays
per image on this machine. No weights are downloaded.

Results: a table on stdout and ``bench/results/scorers-<hostname>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__:
    from . import _common as common
else:
    import _common as common

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(common.REPO))

import torch  # noqa: E402


def _time(objective, images, prompts, *, reps: int) -> float:
    def once() -> None:
        objective.reset()
        objective.update(images, prompts=prompts)
        objective.compute()

    once()  # warm-up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] / len(images)


def _real_size(tmp: Path, names: list[str]) -> dict[str, dict]:
    """Options of the learned scorers in ``names`` at their real size (seeded random weights, saved to ``tmp``)."""
    import open_clip
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from tests import tiny_scorers as tiny

    torch.manual_seed(0)
    out: dict[str, dict] = {}
    if "clip" in names or "aesthetic" in names:
        vit_l = tmp / "vit-l-14.pt"
        torch.save(open_clip.create_model("ViT-L-14", pretrained=None).state_dict(), vit_l)
        out["clip"] = {"clip_model": "ViT-L-14", "clip_weights": str(vit_l)}
        head = tmp / "head.pth"
        torch.save({"weight": torch.randn(1, 768), "bias": torch.zeros(1)}, head)
        out["aesthetic"] = {**out["clip"], "aesthetic_head": str(head)}
    if "hps" in names:
        hps = tmp / "hps.pt"
        torch.save({"state_dict": open_clip.create_model("ViT-H-14", pretrained=None).state_dict()}, hps)
        out["hps"] = {"hps_checkpoint": str(hps)}
    if "pickscore" in names:
        config = CLIPConfig(
            text_config={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "projection_dim": 1024},
            vision_config={"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16, "patch_size": 14,
                           "image_size": 224, "projection_dim": 1024},
            projection_dim=1024)
        CLIPModel(config).save_pretrained(tmp / "pickscore")
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tiny.clip_tokenizer(tmp / "tok")).save_pretrained(tmp / "pickscore")
        out["pickscore"] = {"pickscore_model": str(tmp / "pickscore")}
    if "aesthetic_v25" in names:
        siglip = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14, image_size=384)
        SiglipVisionModel(siglip).save_pretrained(tmp / "siglip")
        SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(tmp / "siglip")
        out["aesthetic_v25"] = {"siglip_model": str(tmp / "siglip"), "aesthetic_v25_head": str(tiny.write_v25_head(tmp / "v25.pth", dim=1152))}
    if "imagereward" in names:
        out["imagereward"] = _imagereward_real_size(tmp / "imagereward")
    return {name: options for name, options in out.items() if name in names}


def _imagereward_real_size(folder: Path) -> dict[str, str]:
    """ImageReward's files at the published size (BLIP ViT-L/16 at 224, BERT-base with cross-attention,
    the 768-1024-128-64-16-1 head), seeded random weights under ImageReward.pt's key names."""
    import json
    import re

    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from objectives.image_reward import MLP_PREFIX, TEXT_PREFIX, VIT_PREFIX
    from tests.reference import imagereward_inputs as inputs

    folder.mkdir(parents=True)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                              image_size=224, patch_size=16, layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=30524, encoder_hidden_size=1024), add_pooling_layer=False)
    back = [(r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
            (r"^embeddings\.patch_embedding\.", "patch_embed.proj."), (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"blocks.\1.norm\2."),
            (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
            (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
            (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."), (r"^post_layernorm\.", "norm.")]
    state = {}
    for key, value in vision.state_dict().items():
        for pattern, repl in back:
            key = re.sub(pattern, repl, key)
        state[VIT_PREFIX + key] = value
    state.update({TEXT_PREFIX + k: v for k, v in text.state_dict().items()})
    sizes = [768, 1024, 128, 64, 16, 1]
    for i, index in enumerate((0, 2, 4, 6, 7)):
        state[f"{MLP_PREFIX}{index}.weight"] = torch.randn(sizes[i + 1], sizes[i]) / sizes[i] ** 0.5
        state[f"{MLP_PREFIX}{index}.bias"] = torch.zeros(sizes[i + 1])
    torch.save(state, folder / "ImageReward.pt")
    med = {**inputs.MED_CONFIG, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
           "max_position_embeddings": 512, "vocab_size": 30524, "encoder_width": 768}
    (folder / "med_config.json").write_text(json.dumps(med), encoding="utf-8")
    return {"imagereward_checkpoint": str(folder / "ImageReward.pt"), "imagereward_med_config": str(folder / "med_config.json"),
            "imagereward_tokenizer": str(inputs.write_vocab(folder / "bert"))}  # tokenising costs the same with the real vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--real-size", action="store_true")
    parser.add_argument("--real-images", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="time only these scorers (and clip, the ratios' base)")
    args = parser.parse_args()

    from objectives.build import build_objectives, objective_spec
    from objectives.registry import scorers
    from tests.test_scorers import BUILDERS

    torch.manual_seed(0)
    prompts = [f"a red digit {i % 10}" for i in range(args.images)]
    images = torch.rand(args.images, 3, 32, 32)
    results: dict = {"machine": common.machine_info(device="cpu", packages=("torch", "transformers", "open_clip_torch")),
                     "threads": torch.get_num_threads(), "tiny": {}, "real_size": {}}
    with tempfile.TemporaryDirectory() as tmp:
        chosen = [n for n in scorers() if args.only is None or n in args.only or n == "clip"]
        for name in chosen:
            (Path(tmp) / name).mkdir()
            (objective,) = build_objectives([objective_spec(name, options=BUILDERS[name](Path(tmp) / name))])
            results["tiny"][name] = {"s_per_image": _time(objective, images, prompts, reps=args.reps)}
        base = results["tiny"]["clip"]["s_per_image"]
        for row in results["tiny"].values():
            row["ratio_to_clip"] = row["s_per_image"] / base
        if args.real_size:
            big = torch.rand(args.real_images, 3, 512, 512)
            (Path(tmp) / "real").mkdir()
            for name, options in _real_size(Path(tmp) / "real", chosen).items():
                (objective,) = build_objectives([objective_spec(name, options=options)])
                results["real_size"][name] = {"s_per_image": _time(objective, big, prompts[: args.real_images], reps=1)}
                del objective
    print(f"{'scorer':<15} {'tiny s/img':>11} {'x clip':>7} {'real-size s/img':>16}")
    for name, row in results["tiny"].items():
        real = results["real_size"].get(name, {}).get("s_per_image")
        print(f"{name:<15} {row['s_per_image']:>11.5f} {row['ratio_to_clip']:>7.2f} {'' if real is None else f'{real:>16.3f}'}")
    path = common.write_json(args.out or common.result_path("scorers"), results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
