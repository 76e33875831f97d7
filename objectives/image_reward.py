"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"): a BLIP image-grounded text encoder with a reward head.

Score of an image and its prompt, as ``ImageReward.score`` of the ``image-reward`` package computes it::

    e      = ViT(image)                                   # BLIP ViT-L/16 tokens at 224 px
    h      = BERT(prompt, cross-attending to e)[:, 0]     # the text [CLS] token
    reward = (MLP(h) - 0.16717362830052426) / 1.0333394966054072

``MLP`` is five ``Linear`` layers (768-1024-128-64-16-1) with no activation between them (the
published code comments them out; its dropouts are off at inference). The prompt goes through
bert-base-uncased with ImageReward's added ``[DEC]`` (bos) and ``[ENC]`` tokens, padded and cut to
35 tokens; the image is resized on its shortest side (bicubic), centre-cropped and normalised with
CLIP's mean/std (``_transform(224)``). Rewards sit around 0 for average images (roughly -2..2).

The ``image-reward`` package itself does not import on transformers 5, so the model runs on
transformers' BLIP port: the ViT as ``BlipVisionModel`` (BLIP's LayerNorm eps 1e-6, 64-wide heads)
and the text encoder as ``BlipTextModel``, whose keys are ``med.py``'s. The sizes are read from the
checkpoint and ``med_config.json``. ``tests/test_scorers.py`` checks the scores against the real
package (run in a side environment, ``tests/reference/make_imagereward_reference.py``).

Weights: ``imagereward_checkpoint`` (``ImageReward.pt``) and ``imagereward_med_config``
(``med_config.json``) from huggingface.co/THUDM/ImageReward; ``imagereward_tokenizer`` a local
folder of bert-base-uncased (``vocab.txt``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from objectives.base import MeanScore, ObjectiveError, check_images
from objectives.preprocess import normalize, resize_shortest_center_crop
from objectives.registry import BuildContext, ScorerSettings, register_scorer
from objectives.settings import LocalPath

SOURCE = "https://huggingface.co/THUDM/ImageReward"
TOKENIZER_SOURCE = "https://huggingface.co/google-bert/bert-base-uncased"
#: ``ImageReward.mean`` / ``ImageReward.std`` of image-reward 1.5
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
#: BLIP's ViT uses 64-wide heads (base: 768 / 12, large: 1024 / 16)
HEAD_WIDTH = 64
VIT_PREFIX, TEXT_PREFIX, MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
_MED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")


class ImageRewardSettings(ScorerSettings):
    imagereward_checkpoint: LocalPath = Field(description=f"ImageReward.pt ({SOURCE})")
    imagereward_med_config: LocalPath = Field(description=f"med_config.json ({SOURCE})")
    imagereward_tokenizer: LocalPath = Field(description=f"local folder of bert-base-uncased with vocab.txt ({TOKENIZER_SOURCE})")


def vit_state(checkpoint: dict[str, Tensor]) -> dict[str, Tensor]:
    """The checkpoint's BLIP ViT keys under ``BlipVisionModel``'s names."""
    out = {}
    for key, value in checkpoint.items():
        if not key.startswith(VIT_PREFIX):
            continue
        name = key.removeprefix(VIT_PREFIX)
        for pattern, repl in _VIT_RENAMES:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        else:
            raise ObjectiveError(f"imagereward: unexpected ViT key {key}")
        out[name] = value
    return out


def _vision_config(vit: dict[str, Tensor]):
    from transformers import BlipVisionConfig

    try:
        positions, width = vit["embeddings.position_embedding"].shape[1:]
        patch = int(vit["embeddings.patch_embedding.weight"].shape[-1])
        depth = 1 + max(int(m.group(1)) for k in vit if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
        intermediate = int(vit["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except (KeyError, ValueError) as exc:
        raise ObjectiveError(f"imagereward: the checkpoint has no complete BLIP ViT ({VIT_PREFIX}*): {exc}") from None
    side = math.isqrt(int(positions) - 1)
    if side * side != positions - 1 or width % HEAD_WIDTH:
        raise ObjectiveError(f"imagereward: unexpected ViT shape ({positions} positions, width {width})")
    return BlipVisionConfig(hidden_size=int(width), intermediate_size=intermediate, num_hidden_layers=depth,
                            num_attention_heads=int(width) // HEAD_WIDTH, image_size=side * patch, patch_size=patch,
                            hidden_act="gelu", layer_norm_eps=1e-6)


def _text_config(med_config: Path, *, encoder_width: int):
    from transformers import BlipTextConfig

    try:
        med = json.loads(med_config.read_text(encoding="utf-8"))
        fields = {name: int(med[name]) for name in _MED_FIELDS}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ObjectiveError(f"imagereward: {med_config}: not BLIP's med_config.json ({type(exc).__name__}: {exc})") from None
    return BlipTextConfig(**fields, encoder_hidden_size=encoder_width, hidden_act=str(med.get("hidden_act", "gelu")),
                          layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)), is_decoder=True,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None, pad_token_id=int(med.get("pad_token_id", 0)))


def reward_head(checkpoint: dict[str, Tensor]) -> nn.Sequential:
    """The reward MLP: the checkpoint's ``mlp.layers.N`` Linears in order, nothing between them."""
    indices = sorted({int(m.group(1)) for k in checkpoint if (m := re.match(r"mlp\.layers\.(\d+)\.weight$", k))})
    if not indices:
        raise ObjectiveError(f"imagereward: the checkpoint has no reward head ({MLP_PREFIX}*)")
    layers = []
    for i in indices:
        weight, bias = checkpoint[f"{MLP_PREFIX}{i}.weight"], checkpoint.get(f"{MLP_PREFIX}{i}.bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        layers.append(linear)
    if layers[-1].out_features != 1:
        raise ObjectiveError(f"imagereward: the reward head ends in {layers[-1].out_features} outputs, not 1")
    return nn.Sequential(*layers)


def load_tokenizer(folder: Path):
    """bert-base-uncased with ImageReward's ``[DEC]`` bos and ``[ENC]`` tokens (BLIP ``init_tokenizer``)."""
    from transformers import BertTokenizer

    if not (folder / "vocab.txt").is_file():
        raise ObjectiveError(f"imagereward_tokenizer: {folder} has no vocab.txt (download bert-base-uncased from {TOKENIZER_SOURCE})")
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _load_strict(module: nn.Module, state: dict[str, Tensor], *, what: str, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ObjectiveError(f"imagereward: {path} does not fit the {what}: {' '.join(str(exc).split())[:300]}") from None


def load_image_reward(settings: ImageRewardSettings, *, device: str = "cpu") -> tuple[nn.Module, nn.Module, nn.Sequential, object]:
    """``(vision, text, head, tokenizer)`` built from the local files (every key of the ViT, the
    text encoder and the head must fit; the checkpoint's unused ``vision_proj``/``text_proj`` are ignored)."""
    from transformers import BlipTextModel, BlipVisionModel

    from optimizer.checkpoint.safe_read import load_torch_weights_only

    path, med = Path(settings.imagereward_checkpoint), Path(settings.imagereward_med_config)
    for file, name in ((path, "ImageReward.pt"), (med, "med_config.json")):
        if not file.is_file():
            raise ObjectiveError(f"imagereward: no {name} at {file} (download it from {SOURCE})")
    tokenizer = load_tokenizer(Path(settings.imagereward_tokenizer))
    checkpoint = load_torch_weights_only(path, error=ObjectiveError, what="imagereward")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ObjectiveError(f"imagereward: {path}: expected a state dict of tensors")
    vit = vit_state(checkpoint)
    vision = BlipVisionModel(_vision_config(vit))
    _load_strict(vision, vit, what="BLIP ViT", path=path)
    text = BlipTextModel(_text_config(med, encoder_width=vision.config.hidden_size), add_pooling_layer=False)
    text_state = {k.removeprefix(TEXT_PREFIX): v for k, v in checkpoint.items()
                  if k.startswith(TEXT_PREFIX) and not k.endswith("embeddings.position_ids")}
    _load_strict(text, text_state, what=f"BLIP text encoder of {med}", path=path)
    if len(tokenizer) > text.config.vocab_size:
        raise ObjectiveError(f"imagereward: the tokenizer has {len(tokenizer)} tokens, the text encoder {text.config.vocab_size}")
    head = reward_head(checkpoint)
    if head[0].in_features != text.config.hidden_size:
        raise ObjectiveError(f"imagereward: the reward head takes {head[0].in_features} features, the text encoder gives {text.config.hidden_size}")
    parts = [m.to(device).eval().requires_grad_(False) for m in (vision, text, head)]
    return parts[0], parts[1], parts[2], tokenizer


@register_scorer
class ImageReward(MeanScore):
    """ImageReward: a BLIP text encoder cross-attending to the image, its [CLS] token through the
    reward MLP, standardised (maximize); see the module docstring."""

    name = "imagereward"
    higher_is_better = True
    Settings = ImageRewardSettings
    weights = f"ImageReward.pt + med_config.json ({SOURCE}) and bert-base-uncased's vocab.txt ({TOKENIZER_SOURCE}); Apache-2.0"
    direction = "maximize"

    def __init__(self, *, vision: nn.Module, text: nn.Module, head: nn.Sequential, tokenizer, batch_size: int = 16) -> None:
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.size = int(vision.config.image_size)
        self.batch_size = batch_size
        self.name = "imagereward"

    @classmethod
    def from_settings(cls, settings: ImageRewardSettings, *, context: BuildContext) -> ImageReward:
        vision, text, head, tokenizer = load_image_reward(settings, device=context.device)
        return cls(vision=vision, text=text, head=head, tokenizer=tokenizer)

    def pixel_values(self, images: Tensor) -> Tensor:
        x = resize_shortest_center_crop(check_images(images), size=self.size, crop=self.size)
        return normalize(x, mean=CLIP_MEAN, std=CLIP_STD)

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image ImageReward of ``images`` with their own ``prompts``."""
        if len(images) != len(prompts):
            raise ObjectiveError(f"imagereward: {len(images)} images but {len(prompts)} prompts")
        device = next(self.head.parameters()).device
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[i : i + self.batch_size]).to(device)
            tokens = self.tokenizer(list(prompts[i : i + self.batch_size]), padding="max_length", truncation=True,
                                    max_length=MAX_TOKENS, return_tensors="pt").to(device)
            embeds = self.vision(pixel_values=pixels).last_hidden_state
            hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=embeds,
                               encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long, device=device)).last_hidden_state
            reward = self.head(hidden[:, 0].float()).squeeze(-1)
            out.append(((reward - REWARD_MEAN) / REWARD_STD).cpu())
        return torch.cat(out)

    def update(self, images: Tensor, *, prompts: Sequence[str]) -> None:
        self.add(self.scores(images, list(prompts)))
