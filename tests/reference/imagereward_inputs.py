"""Deterministic inputs of the ImageReward reference check, shared by the test and by the script that
ran the real ``image-reward`` package on them (``make_imagereward_reference.py``).

Nothing here imports ImageReward or evomerge: weights, vocabulary, prompts and images are pure
functions of numpy's PCG64 generator, so both environments build the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REFERENCE_FILE = Path(__file__).with_name("imagereward_tiny.json")

#: the tiny BLIP ViT (ImageReward's ``vit='large'`` topology, narrow): heads = width / 64 as in BLIP
VISION = {"img_size": 48, "patch_size": 16, "embed_dim": 128, "depth": 2, "num_heads": 2}

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "photo", "of", "the", "red", "blue", "green", "digit",
         "cat", "dog", "on", "in", ",", ".", "3", "7", "##s", "big", "small", "painting", "sky"]

#: BLIP's med_config.json with narrow sizes; ImageReward overwrites encoder_width with the ViT width
MED_CONFIG = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
              "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
              "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
              "vocab_size": len(VOCAB) + 2, "encoder_width": 128, "add_cross_attention": True}

PROMPTS = ["A photo of a red digit 3", "blue cats, on the mat.", "the sky",
           " ".join(["a big green dog in a small painting"] * 6)]  # the last one is cut at 35 tokens

#: (height, width, kind): at the model's input size, larger and non-square, smaller
IMAGES = [(48, 48, "noise"), (48, 48, "waves"), (64, 80, "waves"), (40, 40, "waves")]


def image(index: int) -> np.ndarray:
    """Image ``index`` of :data:`IMAGES` as ``uint8`` ``[H, W, 3]``."""
    h, w, kind = IMAGES[index]
    rng = np.random.default_rng(100 + index)
    if kind == "noise":
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    f = rng.uniform(0.05, 0.3, (3, 2))
    phase = rng.uniform(0, 2 * np.pi, 3)
    waves = np.stack([np.sin(f[c, 0] * x + f[c, 1] * y + phase[c]) for c in range(3)], axis=-1)
    return np.round(127.5 + 127.5 * waves).astype(np.uint8)


def state_dict(shapes: dict[str, list[int]], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded float32 values for every key of an ImageReward state dict with these ``shapes``:
    LayerNorm weights near 1, biases and embeddings small, matrices ~ N(0, 1/fan_in),
    ``position_ids`` the arange BERT keeps as a buffer."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith("position_ids"):
            out[key] = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
            continue
        noise = rng.standard_normal(shape, dtype=np.float32)
        leaf = key.rsplit(".", 1)[-1]
        if ("norm" in key.lower()) and leaf == "weight":
            out[key] = 1.0 + 0.1 * noise
        elif leaf == "bias":
            out[key] = 0.05 * noise
        elif len(shape) < 2 or "embed" in key or "cls_token" in key:
            out[key] = 0.05 * noise
        else:
            out[key] = noise / np.float32(np.sqrt(np.prod(shape[1:])))
    return out


def write_vocab(folder: Path) -> Path:
    """A BERT WordPiece folder (``vocab.txt``, lower-casing) with :data:`VOCAB`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}), encoding="utf-8")
    return folder


def write_med_config(path: Path) -> Path:
    path.write_text(json.dumps(MED_CONFIG, indent=1), encoding="utf-8")
    return path
