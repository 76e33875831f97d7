"""Aesthetic heads on real CLIP embeddings (LAION's rating0..9) from ../shared/assets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from objectives.aesthetic import AestheticHeadError, LinearHead, MLPHead, aesthetic_scores, load_aesthetic_head

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "aesthetic"
needs_assets = pytest.mark.skipif(not ASSETS.is_dir(), reason="../shared/assets/aesthetic is absent (real LAION heads)")


def _ratings(model: str) -> torch.Tensor:
    folder = ASSETS / "laion-aesthetic-predictor" / f"vit_{model}_embeddings"
    return torch.from_numpy(np.concatenate([np.load(folder / f"rating{r}.npy") for r in range(10)]))


@needs_assets
@pytest.mark.parametrize("model", ["l_14", "b_32"])
def test_laion_linear_heads_score_real_embeddings_in_rating_order(model: str) -> None:
    embeddings = _ratings(model)
    head = load_aesthetic_head(ASSETS / "laion-aesthetic-predictor" / f"sa_0_4_vit_{model}_linear.pth", embed_dim=embeddings.shape[1])
    assert isinstance(head, LinearHead)
    scores = aesthetic_scores(head, embeddings)
    rho = spearmanr(np.arange(10), scores.numpy()).statistic
    assert rho > 0.9, (rho, scores)
    assert scores[-1] > scores[0] + 1.0  # a rating-9 image scores clearly above a rating-0 one


@needs_assets
def test_improved_predictor_agrees_with_the_ratings() -> None:
    """sac+logos+ava1-l14-linearMSE, the head SD merge optimizers use, on LAION's rated embeddings."""
    head = load_aesthetic_head(ASSETS / "improved-aesthetic-predictor" / "sac+logos+ava1-l14-linearMSE.pth", embed_dim=768)
    assert isinstance(head, MLPHead) and not head.relu and [layer.out_features for layer in head.layers] == [1024, 128, 64, 16, 1]
    scores = aesthetic_scores(head, _ratings("l_14"))
    assert spearmanr(np.arange(10), scores.numpy()).statistic > 0.8, scores


@needs_assets
def test_improved_predictor_relu_variant_has_its_activations() -> None:
    """The reluMSE files (keys layers.0/3/6/9/11) put a ReLU after every layer but the last. Trained on
    AVA + logos only, this head does NOT rank LAION's ten rated embeddings in order (measured: a
    U shape, Spearman 0.19), so only its structure and finite output are checked here."""
    path = ASSETS / "improved-aesthetic-predictor" / "ava+logos-l14-reluMSE.pth"
    head = load_aesthetic_head(path, embed_dim=768)
    assert isinstance(head, MLPHead) and head.relu
    embeddings = _ratings("l_14")
    scores = aesthetic_scores(head, embeddings)
    assert torch.isfinite(scores).all()
    head.relu = False  # the same weights without the activations give different scores
    assert not torch.allclose(aesthetic_scores(head, embeddings), scores)


@needs_assets
def test_head_width_must_match_the_clip_model() -> None:
    with pytest.raises(AestheticHeadError, match="768-d CLIP embeddings, the CLIP model gives 512-d"):
        load_aesthetic_head(ASSETS / "laion-aesthetic-predictor" / "sa_0_4_vit_l_14_linear.pth", embed_dim=512)


def test_bad_head_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AestheticHeadError, match="no aesthetic head"):
        load_aesthetic_head(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(AestheticHeadError, match="not a weights-only torch file"):
        load_aesthetic_head(tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "odd.pth")
    with pytest.raises(AestheticHeadError, match="unknown aesthetic head layout"):
        load_aesthetic_head(tmp_path / "odd.pth")
    torch.save({"layers.0.weight": torch.zeros(8, 4), "layers.0.bias": torch.zeros(8)}, tmp_path / "open.pth")
    with pytest.raises(AestheticHeadError, match="do not chain to one output"):
        load_aesthetic_head(tmp_path / "open.pth")
