"""Zoo models and training: SD1 keys in every merge block, a few steps learn, training is deterministic."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random

import pytest
import torch
import torch.nn.functional as F

from optimizer.architectures import load_layout
from optimizer.checkpoint.keymap import diffusers_to_ldm
from optimizer.zoo import domain, models, tokenizer, train


@pytest.fixture(scope="module")
def components() -> dict[str, torch.nn.Module]:
    return {
        "vae": models.build_vae(seed=0),
        "text_encoder": models.build_text_encoder(seed=0),
        "unet": models.build_unet(seed=0),
    }


def _images(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    images, captions, _ = next(domain.batches(domain.samples(images="train", captions="train", count=count, seed=seed), batch_size=count))
    return images * 2 - 1, captions


def _ldm(components: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return diffusers_to_ldm(
        components={k: m.state_dict() for k, m in components.items()},
        architecture="sd1",
        unet_config=dict(components["unet"].config),
        vae_config=dict(components["vae"].config),
    )


def test_builders_give_sd1_ldm_keys_in_all_26_blocks(components) -> None:
    layout = load_layout("sd1")
    assignment = layout.assign(_ldm(components).keys())
    assert len(layout.blocks) == 26
    for block in layout.blocks:
        assert assignment.keys_of(block), f"merge block {block} holds no key"
    assert assignment.keys_of("VAE")


def test_component_shapes_and_size_budget(components) -> None:
    vae, text_encoder, unet = components["vae"], components["text_encoder"], components["unet"]
    assert vae.config.block_out_channels and 2 ** (len(vae.config.block_out_channels) - 1) == 4  # 32x32 -> 8x8
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert latents.shape == (1, 4, 8, 8)
    assert text_encoder.config.vocab_size == tokenizer.vocab_size()
    assert text_encoder.config.max_position_embeddings == 77
    assert text_encoder.config.hidden_act == "quick_gelu"
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size
    assert models.parameter_count(unet) + models.parameter_count(text_encoder) < 1_500_000
    assert models.parameter_count(vae) < 500_000


def test_scrambled_captions_keep_the_speciality_and_never_name_held_out_combinations() -> None:
    rng = random.Random(0)
    items = domain.samples(images="train", captions="train", count=300, seed=0)
    held = {f"{fg} digit {d} on a {bg} background" for d, fg, bg in domain.held_out_combinations()}
    for speciality, keep in train.SPECIALITIES.items():
        changed = 0
        for s in items:
            caption = train.scramble(s, keep=keep, rng=rng)
            assert not any(caption.endswith(h) for h in held)
            words = caption.split()
            said = {"thickness": words[1], "slant": words[2], "fg": words[3], "digit": int(words[5]), "bg": words[8]}
            for attribute in keep:
                assert said[attribute] == getattr(s.attributes, attribute)
            changed += caption != s.caption
        assert changed > len(items) // 2, speciality


def test_noisy_captions_keep_the_digit_and_redraw_appearance_at_the_given_rate() -> None:
    items = domain.samples(images="train", captions="train", count=2000, seed=1)
    rng = random.Random(1)
    assert [train.noisy_caption(s, probability=0.0, rng=rng) for s in items[:50]] == [s.caption for s in items[:50]]
    assert rng.random() == random.Random(1).random()  # probability 0 draws nothing
    wrong = {a: 0 for a in train.NOISY_ATTRIBUTES}
    for s in items:
        words = train.noisy_caption(s, probability=0.4, rng=rng).split()
        said = {"thickness": words[1], "slant": words[2], "fg": words[3], "digit": int(words[5]), "bg": words[8]}
        assert said["digit"] == s.attributes.digit
        for a in wrong:
            wrong[a] += said[a] != getattr(s.attributes, a)
    # redrawn with probability 0.4, and a redraw lands on another value most of the time
    # (thickness/slant: 1 in 2; colours: 2 to 4 in 5, as held-out combinations are avoided)
    assert 0.15 * len(items) < wrong["thickness"] < 0.25 * len(items)
    assert 0.15 * len(items) < wrong["slant"] < 0.25 * len(items)
    assert 0.2 * len(items) < wrong["fg"] < 0.4 * len(items)


def test_a_few_vae_steps_reduce_the_reconstruction_loss() -> None:
    images, _ = _images(32, seed=123)

    def loss(vae) -> float:
        with torch.no_grad():
            return F.l1_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images).item()

    before = loss(models.build_vae(seed=5))
    after = loss(train.train_vae(steps=40, seed=5, batch_size=16, progress=False))
    assert after < 0.9 * before


def _diffusion_loss(vae, text_encoder, unet, images, captions) -> float:
    """Epsilon-prediction MSE on a fixed batch with fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler(**models.NOISE_SCHEDULE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(100, 1000, (len(images),), generator=generator)
        context = models.encode_prompts(text_encoder, tokenizer.load_tokenizer(), captions)
        prediction = unet(schedule.add_noise(latents, noise, timesteps), timesteps, context).sample
    return F.mse_loss(prediction, noise).item()


def test_a_few_base_steps_reduce_the_diffusion_loss() -> None:
    vae = models.build_vae(seed=0).eval()
    images, captions = _images(32, seed=321)
    before = _diffusion_loss(vae, *train.train_base(vae=vae, steps=0, seed=3, progress=False), images, captions)
    after = _diffusion_loss(vae, *train.train_base(vae=vae, steps=12, seed=3, batch_size=16, progress=False), images, captions)
    assert after < 0.9 * before


def test_training_is_deterministic() -> None:
    vae = models.build_vae(seed=0).eval()
    runs = [train.train_base(vae=vae, steps=3, seed=11, batch_size=8, progress=False) for _ in range(2)]
    for a, b in zip(runs[0], runs[1], strict=True):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    text_encoder, unet = runs[0]
    tuned = [
        train.finetune(vae=vae, text_encoder=text_encoder, unet=unet, speciality="shape", steps=2, seed=4, batch_size=8, progress=False)
        for _ in range(2)
    ]
    for a, b in zip(tuned[0], tuned[1], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(tuned[0][1].conv_in.weight, unet.conv_in.weight)  # fine-tuned a copy ...
    assert torch.equal(runs[1][1].conv_in.weight, unet.conv_in.weight)  # ... and left the parent alone


def test_generate_is_seeded_per_image(components) -> None:
    pipe = models.build_pipeline(**components)
    prompts = ["a thin upright red digit 3 on a black background", "a bold italic blue digit 5 on a white background"]
    both = models.generate(pipe, prompts=prompts, seeds=[1, 2], steps=2, guidance=3.0)
    alone = models.generate(pipe, prompts=prompts[1:], seeds=[2], steps=2, guidance=3.0)
    assert both.shape == (2, 3, 32, 32) and both.dtype == torch.float32
    assert 0 <= both.min() and both.max() <= 1
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
