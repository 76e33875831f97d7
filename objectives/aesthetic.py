"""Aesthetic score heads on CLIP image embeddings: the LAION linear heads and the improved predictor.

Both take an L2-normalised CLIP image embedding ``e`` (``[N, D]``) and return one score per image
(higher is better; the LAION heads were fit to 1..10 ratings):

* LAION aesthetic predictor (``sa_0_4_vit_{b_32,b_16,l_14}_linear.pth``): ``score = w . e + b``,
  a ``Linear(D, 1)`` state dict with keys ``weight``/``bias``.
* improved aesthetic predictor (``sac+logos+ava1-l14-linearMSE.pth``, the head most SD merge
  optimizers use): an MLP ``D -> 1024 -> 128 -> 64 -> 16 -> 1`` with keys ``layers.N.*``. The
  ``linearMSE`` files have no activation (their dropouts sit at the odd indices); the ``reluMSE``
  files have a ReLU after every layer but the last (their keys skip 3 indices: ReLU + Dropout).

Loaded with ``torch.load(weights_only=True, map_location="cpu")`` only. :func:`load_aesthetic_head`
detects the kind from the keys and checks the embedding width against the CLIP model when given.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from pydantic import Field
from torch import Tensor, nn

from objectives.base import MeanScore, ObjectiveError, check_images
from objectives.clip_score import OpenCLIPSettings, shared_open_clip
from objectives.registry import BuildContext, register_scorer
from objectives.settings import LocalPath
from optimizer.errors import EvomergeError


class AestheticHeadError(EvomergeError, ValueError):
    """An aesthetic head file that is missing, unreadable or of an unknown layout."""


class LinearHead(nn.Module):
    """LAION's linear head: ``w . e + b``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.dim = dim

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.linear(embeddings).squeeze(-1)


class MLPHead(nn.Module):
    """The improved aesthetic predictor's MLP (eval mode: dropout is the identity)."""

    def __init__(self, widths: list[int], *, relu: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.relu = relu
        self.dim = widths[0]

    def forward(self, embeddings: Tensor) -> Tensor:
        x = embeddings
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if self.relu and i < len(self.layers) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike[str], *, embed_dim: int | None = None) -> nn.Module:
    """Load a LAION linear head or an improved-predictor MLP (eval mode, CPU)."""
    path = Path(path)
    from optimizer.checkpoint.safe_read import load_torch_weights_only

    if not path.exists():
        raise AestheticHeadError(f"no aesthetic head at {path}")
    state = load_torch_weights_only(path, error=AestheticHeadError, what="aesthetic head")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AestheticHeadError(f"{path}: expected a state dict of tensors")
    if set(state) == {"weight", "bias"} and state["weight"].ndim == 2 and state["weight"].shape[0] == 1:
        head: nn.Module = LinearHead(state["weight"].shape[1])
        head.linear.load_state_dict(state)
    else:
        indices = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k))})
        if not indices or len(indices) * 2 != len(state):
            raise AestheticHeadError(f"{path}: unknown aesthetic head layout (keys {sorted(state)[:6]})")
        weights = [state[f"layers.{i}.weight"] for i in indices]
        widths = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        if widths[-1] != 1 or any(w.shape[1] != widths[j] for j, w in enumerate(weights)):
            raise AestheticHeadError(f"{path}: layer shapes do not chain to one output: {[tuple(w.shape) for w in weights]}")
        relu = any(b - a == 3 for a, b in zip(indices[:-1], indices[1:], strict=True))
        head = MLPHead(widths, relu=relu)
        for layer, i in zip(head.layers, indices, strict=True):
            layer.load_state_dict({"weight": state[f"layers.{i}.weight"], "bias": state[f"layers.{i}.bias"]})
    if embed_dim is not None and head.dim != embed_dim:
        raise AestheticHeadError(f"{path} takes {head.dim}-d CLIP embeddings, the CLIP model gives {embed_dim}-d")
    return head.eval().requires_grad_(False)


@torch.no_grad()
def aesthetic_scores(head: nn.Module, embeddings: Tensor) -> Tensor:
    """One score per embedding; embeddings are L2-normalised here (as both heads were trained)."""
    e = embeddings.float()
    e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return head(e)


class AestheticSettings(OpenCLIPSettings):
    aesthetic_head: LocalPath = Field(description="a LAION linear head or an improved-predictor MLP .pth")


@register_scorer
class AestheticObjective(MeanScore):
    """LAION aesthetic score: the mean head score of the images seen since :meth:`reset`
    (maximize): a CLIP image tower (any open_clip model, e.g. ViT-L-14 for the LAION/improved
    heads) followed by a linear head or the improved predictor's MLP (see the module docstring)."""

    name = "aesthetic"
    higher_is_better = True
    uses_prompts = False
    Settings = AestheticSettings
    weights = ("the head .pth from github.com/LAION-AI/aesthetic-predictor or christophschuhmann/improved-aesthetic-predictor, "
               "plus the matching open_clip model (ViT-L-14 openai)")
    direction = "maximize"

    def __init__(self, *, clip_model, head: nn.Module, batch_size: int = 64, name: str = "aesthetic") -> None:
        super().__init__()
        self.model = clip_model.eval()
        self.head = head
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_settings(cls, settings: AestheticSettings, *, context: BuildContext) -> AestheticObjective:
        head = load_aesthetic_head(settings.aesthetic_head)  # a bad head file fails before the CLIP model loads
        model, _ = shared_open_clip(settings, context=context)
        return cls(clip_model=model, head=head)

    def update(self, images: Tensor, *, prompts=()) -> None:
        from objectives.clip_score import encode_images

        embeddings = encode_images(self.model, check_images(images), batch_size=self.batch_size)
        if embeddings.shape[1] != self.head.dim:
            raise ObjectiveError(f"{self.name}: the head takes {self.head.dim}-d CLIP embeddings, the CLIP model gives {embeddings.shape[1]}-d")
        self.add(aesthetic_scores(self.head, embeddings.cpu()))
