"""The zoo's scorers: the attribute oracle and the tiny open_clip model (fast API-contract tests).

Training here is a handful of steps; the real quality numbers come from full-length runs.
"""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from optimizer.zoo import clip_model, domain, oracle


def _renders(images: str, captions: str, count: int, seed: int) -> tuple[torch.Tensor, list[domain.Attributes]]:
    items = domain.samples(images=images, captions=captions, count=count, seed=seed)
    return domain.render([s.index for s in items], [s.attributes for s in items]), [s.attributes for s in items]


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# oracle


@pytest.fixture(scope="module")
def short_oracle() -> oracle.Oracle:
    return oracle.train_oracle(steps=40, seed=0, batch_size=64, progress=False)


def test_oracle_predicts_one_class_index_per_head(short_oracle: oracle.Oracle) -> None:
    images, _ = _renders("test", "all", 7, seed=3)
    predicted = short_oracle.predict(images)
    assert list(predicted) == ["digit", "fg", "bg", "thickness", "slant"]
    for name, classes in oracle.HEADS.items():
        assert predicted[name].shape == (7,)
        assert predicted[name].dtype == torch.long
        assert 0 <= int(predicted[name].min()) and int(predicted[name].max()) < len(classes)
    decoded = oracle.decode(predicted)
    assert len(decoded) == 7 and decoded[0]["fg"] in domain.FOREGROUNDS
    with pytest.raises(ValueError):
        short_oracle.predict(torch.zeros(2, 3, 16, 16))


def test_oracle_labels_follow_head_class_order() -> None:
    got = oracle.labels([domain.Attributes(7, "blue", "gray", "bold", "italic")])
    assert {k: int(v) for k, v in got.items()} == {"digit": 7, "fg": 2, "bg": 2, "thickness": 1, "slant": 1}


def test_oracle_save_load_round_trip_is_identical(short_oracle: oracle.Oracle, tmp_path) -> None:
    oracle.save_oracle(short_oracle, tmp_path / "oracle")
    assert {p.name for p in (tmp_path / "oracle").iterdir()} == {oracle.WEIGHTS_FILE, oracle.CONFIG_FILE}
    loaded = oracle.load_oracle(tmp_path / "oracle")
    assert _same_state(short_oracle.net.state_dict(), loaded.net.state_dict())
    assert loaded.config == short_oracle.config
    images, _ = _renders("test", "all", 16, seed=4)
    a, b = short_oracle.logits(images), loaded.logits(images)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_short_oracle_training_beats_chance_on_colours(short_oracle: oracle.Oracle) -> None:
    images, attributes = _renders("test", "all", 300, seed=5)
    accuracy = short_oracle.accuracy(images, attributes)
    assert set(accuracy) == {"digit", "fg", "bg", "thickness", "slant", "all"}
    assert accuracy["fg"] > 0.8  # chance 0.2
    assert accuracy["bg"] > 0.8  # chance 0.33
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_oracle_training_is_deterministic_and_seeded() -> None:
    state = torch.get_rng_state()
    a = oracle.train_oracle(steps=3, seed=11, batch_size=16, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left alone
    b = oracle.train_oracle(steps=3, seed=11, batch_size=16, progress=False)
    c = oracle.train_oracle(steps=3, seed=12, batch_size=16, progress=False)
    assert _same_state(a.net.state_dict(), b.net.state_dict())
    assert not _same_state(a.net.state_dict(), c.net.state_dict())


def test_oracle_trains_on_train_images_only() -> None:
    train = set(domain.image_split()["train"])
    for step in range(3):
        images, attributes = oracle._training_batch(step, seed=0, batch_size=64)
        assert images.shape == (64, 3, 32, 32) and len(attributes) == 64
    items = domain.samples(images="train", captions="all", count=64, seed=0)
    assert {s.index for s in items} <= train


def test_augment_keeps_range_shape_and_is_seeded() -> None:
    images, _ = _renders("train", "all", 8, seed=6)
    a = oracle.augment(images, torch.Generator().manual_seed(0))
    b = oracle.augment(images, torch.Generator().manual_seed(0))
    assert a.shape == images.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert 0 < float((a - images).abs().mean()) < 0.1  # light


# --------------------------------------------------------------------------------------------------
# CLIP


@pytest.fixture(scope="module")
def clip_name() -> str:
    return clip_model.register_zoo_clip()


@pytest.fixture(scope="module")
def short_clip(clip_name: str):
    return clip_model.train_zoo_clip(steps=2, seed=0, batch_size=16, progress=False)


def test_registered_config_creates_a_model_through_open_clip(clip_name: str) -> None:
    assert clip_name == clip_model.MODEL_NAME
    assert clip_name in open_clip.list_models()
    model, _, preprocess = open_clip.create_model_and_transforms(clip_name)
    assert model.visual.image_size == (32, 32)
    assert model.vocab_size == 568 and model.context_length == clip_model.CONTEXT_LENGTH
    tokenizer = open_clip.get_tokenizer(clip_name)
    tokens = tokenizer(["a bold italic red digit 7 on a black background", "a thin upright white digit 0 on a gray background"])
    assert tokens.shape == (2, clip_model.CONTEXT_LENGTH)
    eos = model.text_eos_id
    assert int(tokens[0, 0]) == eos - 1 and int(tokens[0, 11]) == eos and int(tokens[0, 10]) != eos  # <start> + 10 words + <end>
    assert int(tokens.max()) < model.vocab_size
    with torch.no_grad():
        features = model.encode_text(tokens, normalize=True)
    assert features.shape == (2, clip_model.EMBED_DIM)
    # registering again (e.g. another cache folder) keeps one working registration
    assert clip_model.register_zoo_clip() == clip_name
    assert open_clip.get_model_config(clip_name)["text_cfg"]["vocab_size"] == 568


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_weights_load_through_open_clip_pretrained_path(short_clip, clip_name: str, tmp_path, suffix: str) -> None:
    path = clip_model.save_zoo_clip(short_clip, tmp_path / f"zoo_clip{suffix}")
    model, _, preprocess = open_clip.create_model_and_transforms(clip_name, pretrained=str(path))
    assert _same_state(model.state_dict(), short_clip.state_dict())
    loaded, preprocess2, tokenizer = clip_model.load_zoo_clip(path)
    assert _same_state(loaded.state_dict(), short_clip.state_dict())
    assert not loaded.training
    images, attributes = _renders("test", "held_out", 4, seed=7)
    captions = [a.caption() for a in attributes]
    expected = clip_model.clip_score(short_clip, tokenizer, images, captions)
    assert torch.equal(clip_model.clip_score(loaded, tokenizer, images, captions), expected)


def test_preprocess_takes_32px_pil_images_like_clip_score_normalisation(short_clip, clip_name: str) -> None:
    _, _, preprocess = open_clip.create_model_and_transforms(clip_name)
    images, _ = _renders("test", "all", 3, seed=8)
    quantised = (images * 255).round() / 255  # what a PIL round trip keeps
    pil = [Image.fromarray((q.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for q in quantised]
    via_pil = torch.stack([preprocess(p) for p in pil])
    assert via_pil.shape == (3, 3, 32, 32)
    direct = clip_model.prepare_images(short_clip, quantised)
    torch.testing.assert_close(via_pil, direct, atol=1e-5, rtol=0)


def test_clip_score_shape_range_and_definition(short_clip, clip_name: str) -> None:
    tokenizer = open_clip.get_tokenizer(clip_name)
    images, attributes = _renders("test", "held_out", 6, seed=9)
    captions = [a.caption() for a in attributes]
    scores = clip_model.clip_score(short_clip, tokenizer, images, captions)
    assert scores.shape == (6,) and scores.dtype == torch.float32
    assert float(scores.min()) >= 0 and float(scores.max()) <= 100
    with torch.no_grad():
        i = short_clip.encode_image(clip_model.prepare_images(short_clip, images), normalize=True)
        t = short_clip.encode_text(tokenizer(captions), normalize=True)
    torch.testing.assert_close(scores, (100 * (i * t).sum(-1)).clamp(min=0))
    assert clip_model.clip_score(short_clip, tokenizer, images[:0], []).shape == (0,)
    with pytest.raises(ValueError):
        clip_model.clip_score(short_clip, tokenizer, images, captions[:2])


def test_clip_training_is_deterministic_and_seeded(short_clip) -> None:
    again = clip_model.train_zoo_clip(steps=2, seed=0, batch_size=16, progress=False)
    other = clip_model.train_zoo_clip(steps=2, seed=1, batch_size=16, progress=False)
    assert _same_state(again.state_dict(), short_clip.state_dict())
    assert not _same_state(other.state_dict(), short_clip.state_dict())


def test_clip_training_batches_hold_distinct_training_captions_of_train_images() -> None:
    train = set(domain.image_split()["train"])
    for step in range(3):
        batch = clip_model._training_batch(step, seed=0, batch_size=128, hard_fraction=0.5)
        assert len(batch) == 128
        assert len({s.caption for s in batch}) == 128
        assert not any(domain.is_held_out(s.attributes) for s in batch)
        assert {s.index for s in batch} <= train
        assert all(domain.source_digit(s.index) == s.attributes.digit for s in batch)


def test_caption_matching_reports_fractions(short_clip, clip_name: str) -> None:
    tokenizer = open_clip.get_tokenizer(clip_name)
    out = clip_model.caption_matching(short_clip, tokenizer, count=40, seed=0)
    assert set(out) == {"shuffled", "digit", "fg", "bg", "thickness", "slant"}
    assert all(0.0 <= v <= 1.0 for v in out.values())
