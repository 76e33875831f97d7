"""CLIP score objective: any open_clip model by name + weights file; tested with the zoo's trained CLIP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from objectives.base import Objective, ObjectiveError
from objectives.clip_score import CLIPScoreObjective, clip_score
from optimizer.zoo import domain, paths

ZOO = paths.default_zoo_dir()
needs_zoo = pytest.mark.skipif(not paths.clip_file(ZOO).is_file(), reason="studies/zoo is not built (evomerge zoo build)")


@needs_zoo
def test_matching_captions_beat_shuffled_ones_for_nearly_every_image() -> None:
    objective = CLIPScoreObjective.from_pretrained("evomerge-digits-clip", pretrained=paths.clip_file(ZOO))
    assert isinstance(objective, Objective) and objective.direction == "maximize"
    items = domain.samples(images="test", captions="held_out", count=200, seed=3)
    images = domain.render([s.index for s in items], [s.attributes for s in items])
    captions = [s.caption for s in items]
    shuffled = captions[1:] + captions[:1]
    matching = clip_score(objective.model, objective.tokenizer, images, captions)
    wrong = clip_score(objective.model, objective.tokenizer, images, shuffled)
    share = (matching > wrong).float().mean().item()
    assert share > 0.95, share

    objective.update(images[:120], prompts=captions[:120])
    objective.update(images[120:], prompts=captions[120:])
    assert objective.compute() == pytest.approx(matching.double().mean().item(), rel=1e-6)
    objective.reset()
    objective.update(images, prompts=shuffled)
    assert objective.compute() < matching.mean().item() - 10


def test_bad_names_files_and_inputs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-clip'"):
        CLIPScoreObjective.from_pretrained("no-such-clip")
    with pytest.raises(ObjectiveError, match="no CLIP weights file"):
        CLIPScoreObjective.from_pretrained("evomerge-digits-clip", pretrained=tmp_path / "missing.safetensors")
    objective = CLIPScoreObjective.from_pretrained("evomerge-digits-clip")  # random init: only the contract
    with pytest.raises(ValueError, match="no images scored"):
        objective.compute()
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        objective.update(torch.rand(2, 3, 32, 32), prompts=["a red digit 1 on a black background"])


@needs_zoo
def test_zoo_clip_image_tower_as_fid_features_separates_renders_from_noise() -> None:
    from objectives.clip_score import CLIPImageFeatures, load_open_clip
    from objectives.fid import FIDObjective, reference_features

    model, _ = load_open_clip("evomerge-digits-clip", pretrained=paths.clip_file(ZOO))
    feature = CLIPImageFeatures(model, name="evomerge-digits-clip")
    assert feature.num_features == 64 and feature.name == "clip-image:evomerge-digits-clip"

    def renders(seed: int) -> torch.Tensor:
        items = domain.samples(images="test", captions="held_out", count=300, seed=seed)
        return domain.render([s.index for s in items], [s.attributes for s in items])

    fid = FIDObjective(reference=reference_features(feature=feature, images=renders(1)), feature=feature, name="fid_clip")
    fid.update(renders(2), prompts=[])
    real = fid.compute()
    fid.reset()
    fid.update(torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0)), prompts=[])
    noise = fid.compute()
    assert real < 0.1 * noise, (real, noise)


# ------------------------------------------------------------------ defaults name no demo model
def test_the_default_clip_is_vit_l_14_with_openai_weights_and_offline_it_says_so_in_one_line(capfd, monkeypatch) -> None:
    """A study that names no CLIP gets what SD users mean by CLIP score; without a network (the
    tests' HF_HUB_OFFLINE=1) that is one clear error, and open_clip's own log line is not printed."""
    from objectives.clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_WEIGHTS, OpenCLIPSettings, load_open_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = OpenCLIPSettings()
    assert (settings.clip_model, settings.clip_weights) == (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_WEIGHTS) == ("ViT-L-14", "openai")
    capfd.readouterr()
    with pytest.raises(ObjectiveError, match=r"cannot load open_clip ViT-L-14 weights 'openai' .*give clip_weights a local file") as caught:
        load_open_clip("ViT-L-14", pretrained="openai")
    assert "\n" not in str(caught.value)
    assert "Failed to download" not in capfd.readouterr().err  # open_clip's ERROR log is not shown beside our line
    with pytest.raises(ObjectiveError, match=r"ViT-L-14 has no open_clip pretrained tag 'nope' \(its tags: openai, "):
        load_open_clip("ViT-L-14", pretrained="nope")


def test_the_zoo_clip_is_a_plug_in_named_with_its_weights_file(tmp_path: Path) -> None:
    """The zoo's CLIP reaches open_clip through the ``evomerge.open_clip_models`` entry point, and
    like any model without a pretrained tag it needs its weights named."""
    from objectives.clip_score import load_open_clip

    with pytest.raises(ObjectiveError, match="evomerge-digits-clip has no open_clip pretrained tag 'openai' .*give a local weights file"):
        load_open_clip("evomerge-digits-clip", pretrained="openai")
    model, tokenizer = load_open_clip("evomerge-digits-clip", pretrained=None)  # random weights: registered through the plug-in
    assert tokenizer(["a red digit 1"]).shape[0] == 1 and not model.training


def test_clip_weights_in_a_study_file_resolve_against_it_when_they_are_a_path(tmp_path: Path) -> None:
    from optimizer.study.config import parse_study_config

    def weights(value: str) -> str:
        data = {"name": "w", "parents": ["a.safetensors", "b.safetensors"], "search_space": {"alpha": {}}, "objectives": ["clip"],
                "scorers": {"clip_model": "evomerge-digits-clip", "clip_weights": value}, "prompts": "p.yaml", "budget": {"trials": 1}}
        return parse_study_config(data, base=tmp_path).scorers.clip_weights

    assert weights("zoo/clip.safetensors") == str((tmp_path / "zoo" / "clip.safetensors").resolve())
    assert weights("clip.bin") == str((tmp_path / "clip.bin").resolve())  # a file suffix marks a path
    assert weights("laion2b_s34b_b79k") == "laion2b_s34b_b79k"  # a pretrained tag stays a tag
