"""Output ensembles: eps = sum_i w_i * eps_i inside a diffusers StableDiffusionPipeline."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from optimizer.render.ensemble import EnsembleError, EnsembleTextEncoder, EnsembleUNet, ensemble_pipeline
from optimizer.zoo import models, paths

needs_zoo = pytest.mark.skipif(not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built")

STEPS = 2
PROMPTS = ["a red digit 3 on a blue background", "a thin digit 7"]
SEEDS = [0, 5]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- tiny models
#: the zoo's model configs (optimizer.zoo.models), shrunk so the ensemble tests run in seconds
SMALL_UNET = dict(
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32),
    layers_per_block=1,
    cross_attention_dim=32,
)
SMALL_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.18215,
)


def _tiny_unet(seed: int, **overrides):
    return models.build_unet(seed=seed, **{**SMALL_UNET, **overrides}).eval()


def _tiny_text_encoder(seed: int, hidden: int = 32):
    return models.build_text_encoder(seed=seed, hidden_size=hidden, intermediate_size=hidden * 2, projection_dim=hidden).eval()


def _tiny_vae(seed: int = 0, **overrides):
    return models.build_vae(seed=seed, **{**SMALL_VAE, **overrides}).eval()


def _pipe(tokenizer_dir: Path, *, unet, text_encoder, vae):
    from optimizer.zoo.models import build_pipeline

    return build_pipeline(vae=vae, text_encoder=text_encoder, unet=unet, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optimizer.zoo.tokenizer import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tiny(tokenizer_dir: Path) -> dict:
    """Pipelines ``a`` and ``b`` share one text encoder and VAE; ``c`` has its own text encoder."""
    text_encoder, vae = _tiny_text_encoder(1), _tiny_vae()
    return {
        "a": _pipe(tokenizer_dir, unet=_tiny_unet(10), text_encoder=text_encoder, vae=vae),
        "b": _pipe(tokenizer_dir, unet=_tiny_unet(11), text_encoder=text_encoder, vae=vae),
        "c": _pipe(tokenizer_dir, unet=_tiny_unet(12), text_encoder=_tiny_text_encoder(2), vae=vae),
    }


def _images(pipe) -> torch.Tensor:
    height = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        generator=[torch.Generator("cpu").manual_seed(s) for s in SEEDS],
        height=height,
        width=height,
        output_type="pt",
    ).images


def _unet_inputs(width: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 7, width, generator=g)


# ---------------------------------------------------------------------------------- the UNet
@torch.no_grad()
def test_unet_output_is_the_weighted_sum_of_the_members_predictions(tiny) -> None:
    unet_a, unet_b = tiny["a"].unet, tiny["b"].unet
    sample, t, text = _unet_inputs()
    eps_a = unet_a(sample, t, text).sample
    eps_b = unet_b(sample, t, text).sample
    ensemble = EnsembleUNet(members=[unet_a, unet_b], weights=[0.6, 0.4])
    assert ensemble.weights == (0.6, 0.4) and isinstance(ensemble.weights, tuple)
    out = ensemble(sample, t, encoder_hidden_states=text)
    torch.testing.assert_close(out.sample, 0.6 * eps_a + 0.4 * eps_b, atol=1e-6, rtol=1e-5)
    assert ensemble.calls == 2
    # weights change per trial without rebuilding anything; they need not sum to 1 and may be negative
    ensemble.set_weights((1.5, -0.25))
    (tupled,) = ensemble(sample, t, text, return_dict=False)
    torch.testing.assert_close(tupled, 1.5 * eps_a - 0.25 * eps_b, atol=1e-6, rtol=1e-5)
    ensemble.set_weights([1, 0])
    assert ensemble.weights == (1.0, 0.0)
    assert torch.equal(ensemble(sample, t, text).sample, eps_a)
    assert ensemble.calls == 5  # 2 + 2 + 1: the zero-weight member was not called
    assert ensemble.config is unet_a.config and ensemble.dtype == torch.float32 and ensemble.device.type == "cpu"


@torch.no_grad()
def test_a_zero_weight_member_is_never_called(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    unet_a, unet_b = tiny["a"].unet, tiny["b"].unet

    def boom(*args, **kwargs):
        raise AssertionError("a zero-weight member was called")

    monkeypatch.setattr(unet_b, "forward", boom)
    sample, t, text = _unet_inputs()
    ensemble = EnsembleUNet(members=[unet_a, unet_b], weights=(0.0, 1.0))
    ensemble.set_weights((2.0, 0.0))
    assert torch.equal(ensemble(sample, t, text).sample, 2.0 * unet_a(sample, t, text).sample)
    assert ensemble.calls == 1


@torch.no_grad()
def test_split_mode_gives_each_member_its_own_slice(tiny) -> None:
    unet_a, unet_w = tiny["a"].unet, _tiny_unet(13, cross_attention_dim=16)
    sample, t, text = _unet_inputs(width=48)
    ensemble = EnsembleUNet(members=[unet_a, unet_w], weights=(0.5, 0.25), split_encoder_hidden_states=True)
    assert ensemble.widths == (32, 16)
    expected = 0.5 * unet_a(sample, t, text[..., :32]).sample + 0.25 * unet_w(sample, t, text[..., 32:]).sample
    torch.testing.assert_close(ensemble(sample, t, text).sample, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(EnsembleError, match=r"has 32 features.*\(32, 16\).*48"):
        ensemble(sample, t, text[..., :32])


# ---------------------------------------------------------------------------------- pipelines
def test_pipeline_with_one_zero_weight_renders_the_other_member_bit_for_bit(tiny) -> None:
    a, b = tiny["a"], tiny["b"]
    pipe = ensemble_pipeline(pipes=[a, b], weights=[1.0, 0.0])
    assert type(pipe) is type(a) and isinstance(pipe.unet, EnsembleUNet)
    # shared text encoder: used directly; everything but the UNet is member 0's own module
    assert pipe.text_encoder is a.text_encoder and pipe.vae is a.vae and pipe.tokenizer is a.tokenizer
    assert pipe.scheduler is a.scheduler and pipe.unet.members[0] is a.unet and pipe.unet.members[1] is b.unet
    assert torch.equal(_images(pipe), _images(a))
    pipe.unet.set_weights((0.0, 1.0))
    assert torch.equal(_images(pipe), _images(b))
    # a real mix differs from both parents and costs one call per member per step (CFG is batched)
    pipe.unet.set_weights((0.6, 0.4))
    pipe.unet.calls = 0
    mixed = _images(pipe)
    assert pipe.unet.calls == 2 * len(pipe.scheduler.timesteps) == 2 * STEPS
    assert not torch.equal(mixed, _images(a)) and not torch.equal(mixed, _images(b))
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32


def test_different_text_encoders_are_concatenated_and_split(tiny) -> None:
    a, c = tiny["a"], tiny["c"]
    pipe = ensemble_pipeline(pipes=[a, c], weights=(1, 0))
    assert isinstance(pipe.text_encoder, EnsembleTextEncoder) and pipe.unet.split_encoder_hidden_states
    assert pipe.text_encoder.widths == (32, 32) and pipe.text_encoder.config.hidden_size == 64
    assert a.text_encoder.config.hidden_size == 32  # the member's own config is untouched
    embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert embeds.shape == (2, 77, 64)
    assert torch.equal(embeds[..., :32], a.encode_prompt(PROMPTS, "cpu", 1, False)[0])
    assert torch.equal(embeds[..., 32:], c.encode_prompt(PROMPTS, "cpu", 1, False)[0])
    assert torch.equal(_images(pipe), _images(a))
    pipe.unet.set_weights((0, 1))
    assert torch.equal(_images(pipe), _images(c))
    with pytest.raises(EnsembleError, match="clip_skip"):
        pipe.encode_prompt(PROMPTS, "cpu", 1, False, clip_skip=1)


@pytest.fixture(scope="module")
def zoo() -> dict:
    if not (paths.default_zoo_dir() / paths.MANIFEST).is_file():
        pytest.skip("studies/zoo is not built")
    from optimizer.zoo.build import load_zoo_pipeline

    return {name: load_zoo_pipeline(name) for name in ("base", "shape", "other_init")}


@needs_zoo
def test_zoo_fine_tunes_share_the_text_encoder_and_weights_select_a_parent(zoo) -> None:
    from optimizer.render.prompts import parse_prompt_set
    from optimizer.render.renderer import Renderer
    from optimizer.zoo.prompts import zoo_prompt_set_data

    base, shape = zoo["base"], zoo["shape"]
    pipe = ensemble_pipeline(pipes=[base, shape], weights=(1.0, 0.0))
    # separately loaded, equal tensors: one text encoder, no concatenation
    assert pipe.text_encoder is base.text_encoder and base.text_encoder is not shape.text_encoder
    data = zoo_prompt_set_data()
    data.update(search=data["search"][:1], held_out=[], steps=STEPS, seeds=[0, 1])
    prompt_set = parse_prompt_set(data)
    jobs = prompt_set.jobs("search")
    ensemble = Renderer(pipe, prompt_set=prompt_set, batch_size=4)
    assert torch.equal(ensemble.render(jobs), Renderer(base, prompt_set=prompt_set, batch_size=4).render(jobs))
    pipe.unet.set_weights((0.0, 1.0))
    assert torch.equal(ensemble.render(jobs), Renderer(shape, prompt_set=prompt_set, batch_size=4).render(jobs))
    pipe.unet.set_weights((0.6, 0.4))
    pipe.unet.calls = 0
    mixed = ensemble.render(jobs)
    assert mixed.shape == (2, 3, 32, 32) and bool(torch.isfinite(mixed).all())
    assert pipe.unet.calls == 2 * STEPS  # one batch of 2 images, two members, CFG batched


@needs_zoo
def test_zoo_models_with_separately_trained_text_encoders(zoo) -> None:
    base, other = zoo["base"], zoo["other_init"]
    pipe = ensemble_pipeline(pipes=[base, other], weights=(1.0, 0.0))
    assert isinstance(pipe.text_encoder, EnsembleTextEncoder) and pipe.text_encoder.widths == (64, 64)
    assert torch.equal(_images(pipe), _images(base))
    pipe.unet.set_weights((0.0, 1.0))
    assert torch.equal(_images(pipe), _images(other))
    pipe.unet.set_weights((0.5, 0.5))
    pipe.text_encoder.calls = pipe.unet.calls = 0
    assert bool(torch.isfinite(_images(pipe)).all())
    assert pipe.unet.calls == 2 * STEPS and pipe.text_encoder.calls == 2 * 2  # prompt + negative, two members


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ((1.0,), "expected 2 weights"),
        ((1.0, 0.5, 0.5), "expected 2 weights"),
        ((float("nan"), 1.0), r"weights\[0\] must be finite"),
        ((1.0, float("inf")), r"weights\[1\] must be finite"),
        ((0.0, 0), "at least one weight must be non-zero"),
        ((1.0, "0.5"), r"weights\[1\] must be a real number"),
        ((True, 1.0), r"weights\[0\] must be a real number"),
        (0.5, "must be a sequence"),
    ],
)
def test_bad_weights_are_rejected(tiny, weights, message: str) -> None:
    members = [tiny["a"].unet, tiny["b"].unet]
    with pytest.raises(EnsembleError, match=message):
        EnsembleUNet(members=members, weights=weights)
    ensemble = EnsembleUNet(members=members, weights=(0.6, 0.4))
    with pytest.raises(EnsembleError, match=message):
        ensemble.set_weights(weights)
    assert ensemble.weights == (0.6, 0.4)  # a rejected update changes nothing
    with pytest.raises(EnsembleError, match=message):
        ensemble_pipeline(pipes=[tiny["a"], tiny["b"]], weights=weights)
    assert issubclass(EnsembleError, ValueError)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"in_channels": 8}, "in_channels"),
        ({"out_channels": 8}, "out_channels"),
        ({"sample_size": 16}, "sample_size"),
        ({"cross_attention_dim": 16}, "cross_attention_dim"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
    ],
)
def test_members_must_agree_on_the_unet_config(tiny, overrides: dict, field: str) -> None:
    other = _tiny_unet(20, **overrides)
    with pytest.raises(EnsembleError, match=rf"disagree on UNet config field '{field}'"):
        EnsembleUNet(members=[tiny["a"].unet, other], weights=(0.5, 0.5))


def test_construction_errors(tiny) -> None:
    unet = tiny["a"].unet
    with pytest.raises(EnsembleError, match="at least one member"):
        EnsembleUNet(members=[], weights=())
    with pytest.raises(EnsembleError, match=r"members\[1\] must be a diffusers UNet2DConditionModel"):
        EnsembleUNet(members=[unet, torch.nn.Linear(2, 2)], weights=(1, 1))
    with pytest.raises(EnsembleError, match="disagree on UNet dtype"):
        EnsembleUNet(members=[unet, copy.deepcopy(tiny["b"].unet).to(torch.float64)], weights=(1, 1))
    with pytest.raises(EnsembleError, match="at least one pipeline"):
        ensemble_pipeline(pipes=[], weights=())


def test_pipelines_must_agree_on_tokenizer_vae_and_noise_schedule(tiny) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from optimizer.render.pipelines import replace_components
    from optimizer.zoo.models import NOISE_SCHEDULE

    a, b = tiny["a"], tiny["b"]

    def pipes(**changes) -> list:
        return [a, replace_components(b, **changes)]

    bigger = copy.deepcopy(b.tokenizer)
    bigger.add_tokens(["<new-token>"])
    with pytest.raises(EnsembleError, match="tokenizer vocabulary size"):
        ensemble_pipeline(pipes=pipes(tokenizer=bigger), weights=(0.5, 0.5))
    with pytest.raises(EnsembleError, match="VAE config field 'scaling_factor'"):
        ensemble_pipeline(pipes=pipes(vae=_tiny_vae(scaling_factor=0.5)), weights=(0.5, 0.5))
    deeper = _tiny_vae(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16)
    )
    with pytest.raises(EnsembleError, match="VAE downsampling factor"):
        ensemble_pipeline(pipes=pipes(vae=deeper), weights=(0.5, 0.5))
    v_prediction = DPMSolverMultistepScheduler(**{**NOISE_SCHEDULE, "prediction_type": "v_prediction"}, steps_offset=1)
    with pytest.raises(EnsembleError, match="scheduler config field 'prediction_type'"):
        ensemble_pipeline(pipes=pipes(scheduler=v_prediction), weights=(0.5, 0.5))
    # a different VAE with the same latent space is accepted; member 0's decodes
    pipe = ensemble_pipeline(pipes=pipes(vae=_tiny_vae(seed=9)), weights=(0.5, 0.5))
    assert pipe.vae is a.vae


def test_text_encoder_width_must_match_the_unet(tiny, tokenizer_dir: Path) -> None:
    wide = _pipe(tokenizer_dir, unet=tiny["a"].unet, text_encoder=_tiny_text_encoder(3, hidden=48), vae=tiny["a"].vae)
    with pytest.raises(EnsembleError, match="member 1: text encoder hidden_size 48 != UNet cross_attention_dim 32"):
        ensemble_pipeline(pipes=[tiny["a"], wide], weights=(0.5, 0.5))


def test_sdxl_is_rejected(tokenizer_dir: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from optimizer.testing.tiny_models import tiny_sdxl_components
    from optimizer.zoo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    sdxl = StableDiffusionXLPipeline(
        **tiny_sdxl_components(), tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=EulerDiscreteScheduler()
    )
    with pytest.raises(EnsembleError, match=r"pipes\[0\] is a StableDiffusionXLPipeline: only Stable Diffusion 1.x/2.x"):
        ensemble_pipeline(pipes=[sdxl, sdxl], weights=(0.5, 0.5))
