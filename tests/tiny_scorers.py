"""Tiny random-config versions of each learned scorer's real architecture, saved as the files users
download (a transformers folder, an open_clip checkpoint, a head ``.pth``), for tests only."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_HPS_MODEL = "evomerge-tiny-hps"


def clip_tokenizer(folder: Path):
    """The real CLIP BPE tokenizer (built offline from open_clip's vocabulary), saved in ``folder``."""
    from transformers import CLIPTokenizer

    from optimizer.checkpoint.config_dir import clip_bpe_files

    vocab, merges = clip_bpe_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def write_pickscore(folder: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIPModel (PickScore's class) with a CLIP processor in one folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "projection_dim": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8, "projection_dim": 16},
        projection_dim=16, logit_scale_init_value=4.6052,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    tokenizer = clip_tokenizer(folder / "tok")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def register_tiny_hps() -> str:
    """A small ViT open_clip config (HPS's ViT-H-14 topology, narrow) registered with open_clip."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    if TINY_HPS_MODEL not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[TINY_HPS_MODEL] = {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        }
    assert TINY_HPS_MODEL in open_clip.list_models()
    return TINY_HPS_MODEL


def write_hps_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """An HPS-format checkpoint (``{"state_dict": ...}``) of the tiny open_clip model."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(register_tiny_hps(), pretrained=None)
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    return path


def write_siglip(folder: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny SigLIP vision tower with its image processor (both sides resized, mean = std = 0.5)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=8)
    SiglipVisionModel(config).eval().save_pretrained(folder)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_v25_head(path: Path, *, dim: int = 32, seed: int = 0) -> Path:
    """A v2.5 head state dict (keys ``scoring_head.N.*``, as the published .pth)."""
    from collections import OrderedDict

    from aesthetic_predictor_v2_5.siglip_v2_5 import AestheticPredictorV2_5Head
    from transformers import SiglipVisionConfig

    torch.manual_seed(seed)
    head = AestheticPredictorV2_5Head(SiglipVisionConfig(hidden_size=dim))
    torch.save(OrderedDict(head.state_dict()), path)
    return path


def write_imagereward(folder: Path) -> dict[str, str]:
    """ImageReward's three files (``ImageReward.pt``, ``med_config.json``, a bert folder) for the tiny
    BLIP of ``tests/reference/imagereward_inputs.py``, with the seeded weights the reference scored."""
    import json

    from tests.reference import imagereward_inputs as inputs

    folder.mkdir(parents=True, exist_ok=True)
    shapes = json.loads(inputs.REFERENCE_FILE.read_text(encoding="utf-8"))["shapes"]
    state = {key: torch.from_numpy(value) for key, value in inputs.state_dict(shapes).items()}
    torch.save(state, folder / "ImageReward.pt")
    return {"imagereward_checkpoint": str(folder / "ImageReward.pt"),
            "imagereward_med_config": str(inputs.write_med_config(folder / "med_config.json")),
            "imagereward_tokenizer": str(inputs.write_vocab(folder / "bert-base-uncased"))}
