"""The zoo's domain (real digits, coloured and styled) and its tokenizer."""

from __future__ import annotations

import pytest
import torch

from optimizer.zoo import domain, tokenizer


def test_held_out_combinations_are_fixed_and_never_trained_on() -> None:
    held = domain.held_out_combinations()
    assert len(held) == round(domain.HELD_OUT_FRACTION * len(domain.all_combinations()))
    train = domain.samples(images="train", captions="train", count=2000, seed=1)
    assert not any(s.attributes.combination in held for s in train)
    kept = {c for c in domain.all_combinations() if c not in held}
    assert {c[0] for c in kept} == set(domain.DIGITS)  # every digit, colour and background is still trained
    assert {c[1] for c in kept} == set(domain.FOREGROUNDS) and {c[2] for c in kept} == set(domain.BACKGROUNDS)
    evaluation = domain.samples(images="test", captions="held_out", count=500, seed=2)
    assert all(domain.is_held_out(s.attributes) for s in evaluation)


def test_image_splits_are_disjoint_and_labels_match_captions() -> None:
    split = domain.image_split()
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    for s in domain.samples(images="test", captions="all", count=200, seed=3):
        assert s.index in split["test"] and domain.source_digit(s.index) == s.attributes.digit


def test_rendering_is_deterministic_and_follows_the_attributes() -> None:
    items = domain.samples(images="train", captions="train", count=16, seed=0)
    a = domain.render([s.index for s in items], [s.attributes for s in items])
    b = domain.render([s.index for s in items], [s.attributes for s in items])
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b)
    assert 0.0 <= a.min() and a.max() <= 1.0
    index = domain.samples(images="train", captions="train", count=1, seed=5)[0].index
    digit = domain.source_digit(index)
    red_on_black = domain.render([index], [domain.Attributes(digit=digit, fg="red", bg="black")])[0]
    corner = red_on_black[:, 0, 0] * 255
    assert torch.allclose(corner, torch.tensor(domain.COLOURS["black"], dtype=torch.float32), atol=1)
    brightest = red_on_black.sum(0).flatten().argmax()
    assert torch.allclose(red_on_black.flatten(1)[:, brightest] * 255, torch.tensor(domain.COLOURS["red"], dtype=torch.float32), atol=1)
    thin, bold = domain.render([index] * 2, [domain.Attributes(digit=digit, fg="white", bg="black", thickness=t) for t in ("thin", "bold")])
    assert bold.mean() > thin.mean() * 1.2  # bold strokes cover more pixels


def test_captions_and_bad_attributes() -> None:
    attrs = domain.Attributes(digit=7, fg="red", bg="black", thickness="bold", slant="italic")
    assert attrs.caption() == "a bold italic red digit 7 on a black background"
    with pytest.raises(ValueError, match="both 'white'"):
        domain.Attributes(digit=1, fg="white", bg="white")
    with pytest.raises(ValueError, match="foreground 'pink'"):
        domain.Attributes(digit=1, fg="pink", bg="black")
    with pytest.raises(ValueError, match="not a"):
        index = domain.image_split()["train"][0]
        wrong = (domain.source_digit(index) + 1) % 10
        domain.render([index], [domain.Attributes(digit=wrong, fg="red", bg="black")])
    with pytest.raises(ValueError, match="captions must be"):
        domain.samples(images="train", captions="everything", count=1, seed=0)


def test_tokenizer_gives_one_token_per_caption_word(tmp_path) -> None:
    tok = tokenizer.load_tokenizer(tokenizer.write_tokenizer(tmp_path / "tok"))
    assert len(tok) == tokenizer.vocab_size()
    caption = "a bold italic red digit 7 on a black background"
    ids = tok(caption).input_ids
    assert len(ids) == len(caption.split()) + 2
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in caption.split()]
    assert tok.decode(ids, skip_special_tokens=True).strip() == caption
    assert tok("a photo of a cat").input_ids[-1] == tok.eos_token_id  # foreign text still tokenizes
    padded = tok([caption], padding="max_length", max_length=77).input_ids[0]
    assert len(padded) == 77
