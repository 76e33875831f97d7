"""Run the real ImageReward (``image-reward`` 1.5) on the tiny inputs of ``imagereward_inputs`` and
write what it scores to ``imagereward_tiny.json``, the expected values of
``tests/test_scorers.py::test_imagereward_matches_the_image_reward_package``.

``image-reward`` 1.5 needs transformers 4.x (its BLIP ``med.py`` does not import on transformers 5),
timm, fairscale and openai-clip, so it runs in a side environment on top of evomerge's torch::

    pip download --no-deps transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5 \
        timm==0.9.16 fairscale==0.4.13 image-reward==1.5 clip-anytorch ftfy setuptools==69.5.1
    pip install --no-deps --no-build-isolation --target /tmp/irref ./*.whl fairscale-0.4.13.tar.gz
    PYTHONPATH=/tmp/irref:. HF_HUB_OFFLINE=1 .venv/bin/python -m tests.reference.make_imagereward_reference

The package is used as published: its ``VisionTransformer`` (BLIP ``vit.py``), ``BertModel`` (BLIP
``med.py``), ``init_tokenizer`` (bert-base-uncased + ``[DEC]`` + ``[ENC]``), ``MLP`` and
``ImageReward.score`` (tokenise to 35, ``_transform(224)`` preprocessing, cross-attention, the MLP on
the text CLS token, ``(r - mean) / std``). Only the sizes are narrow and the weights seeded, because
the published model (ViT-L/16 + BERT-base) cannot be fetched here. Two substitutions, both outside
the scoring math: the package's ``__init__`` (which imports its training code) is skipped, and
``BertTokenizer.from_pretrained('bert-base-uncased')`` is pointed at the tiny local vocabulary.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.reference import imagereward_inputs as inputs


def main() -> None:
    spec_dir = None
    for entry in sys.path:
        if (Path(entry) / "ImageReward" / "ImageReward.py").is_file():
            spec_dir = Path(entry) / "ImageReward"
            break
    if spec_dir is None:
        raise SystemExit("image-reward is not on sys.path (see this file's docstring)")
    package = types.ModuleType("ImageReward")
    package.__path__ = [str(spec_dir)]
    sys.modules["ImageReward"] = package

    from ImageReward.ImageReward import MLP, ImageReward, _transform
    from ImageReward.models.BLIP import blip as blip_module
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_dir = inputs.write_vocab(Path(tmp) / "bert")
        med_path = inputs.write_med_config(Path(tmp) / "med_config.json")

        class LocalBertTokenizer(BertTokenizer):
            @classmethod
            def from_pretrained(cls, name, *args, **kwargs):
                assert name == "bert-base-uncased"
                return BertTokenizer.from_pretrained(str(vocab_dir), *args, **kwargs)

        blip_module.BertTokenizer = LocalBertTokenizer
        tokenizer = blip_module.init_tokenizer()

        model = ImageReward.__new__(ImageReward)
        torch.nn.Module.__init__(model)
        model.device = "cpu"
        model.blip = torch.nn.Module()
        model.blip.visual_encoder = VisionTransformer(**inputs.VISION)
        config = BertConfig.from_json_file(str(med_path))
        config.encoder_width = inputs.VISION["embed_dim"]
        model.blip.text_encoder = BertModel(config=config, add_pooling_layer=False)
        model.blip.tokenizer = tokenizer
        model.preprocess = _transform(inputs.VISION["img_size"])
        model.mlp = MLP(config.hidden_size)
        model.mean, model.std = 0.16717362830052426, 1.0333394966054072

        shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
        values = {k: torch.from_numpy(v) for k, v in inputs.state_dict(shapes).items()}
        missing, unexpected = model.load_state_dict(values, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        model.eval()

        images = [Image.fromarray(inputs.image(i)) for i in range(len(inputs.IMAGES))]
        with torch.no_grad():
            scores = [[float(model.score(prompt, img)) for img in images] for prompt in inputs.PROMPTS]
        tokens = [tokenizer(p, padding="max_length", truncation=True, max_length=35)["input_ids"] for p in inputs.PROMPTS]

    out = {
        "source": "image-reward 1.5, ImageReward.score on PIL images",
        "versions": {name: version(name) for name in ("image-reward", "transformers", "timm", "torch")},
        "mean": model.mean, "std": model.std,
        "special_tokens": {"bos_token": tokenizer.bos_token, "enc_token_id": tokenizer.enc_token_id, "vocab_size": len(tokenizer)},
        "shapes": shapes,
        "input_ids": tokens,
        "scores": scores,
    }
    inputs.REFERENCE_FILE.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {inputs.REFERENCE_FILE}: {np.round(scores, 4).tolist()}")


if __name__ == "__main__":
    main()
