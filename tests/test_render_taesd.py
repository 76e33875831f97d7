"""TAESD decoding (optimizer.render.taesd) with the real madebyollin/taesd weights on real photos.

The weights and photos live in ``../shared/assets`` (relative to the project root); tests that
need them skip with the reason when that folder is absent (a fresh clone has none).

PSNR of an encode -> decode round trip of 4 ImageNet photos (256x256), measured on CPU, float32:
correct mapping 25.5 dB (sd) / 25.7 dB (sdxl) mean, 19.5 dB worst photo; the same files with two
same-shape decoder blocks (file layers 3 and 15) exchanged, which the strict loader cannot see,
15.2 / 14.4 dB; a randomly initialised decoder 5.7 dB.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from optimizer.render.taesd import (
    TAESD_CONFIGS,
    TAESDError,
    TAESDFileNotFoundError,
    diffusers_key_to_taesd,
    load_taesd,
    map_taesd_state_dict,
    swap_decoder,
    taesd_files,
    taesd_key_to_diffusers,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
TAESD_DIR = ASSETS / "taesd"
PHOTOS = ASSETS / "imagenet-sample"
VARIANTS = ("sd", "sdxl")
N_PHOTOS = 4
SIZE = 256
# thresholds, from the figures in the module docstring with a margin
MIN_MEAN_PSNR = 23.0
MIN_PHOTO_PSNR = 17.0
MIN_GAP_DB = 7.0  # correct minus wrong-mapping mean PSNR


def _require_taesd(variant: str) -> tuple[Path, Path]:
    files = taesd_files(TAESD_DIR, variant)  # type: ignore[arg-type]
    absent = [str(p) for p in files if not p.is_file()]
    if absent:
        pytest.skip(f"real TAESD weights absent (expected in ../shared/assets/taesd): {', '.join(absent)}")
    return files


def _require_photos() -> list[Path]:
    files = sorted(PHOTOS.glob("*.JPEG")) if PHOTOS.is_dir() else []
    if len(files) < N_PHOTOS:
        pytest.skip(f"real ImageNet photos absent (expected >= {N_PHOTOS} JPEGs in {PHOTOS})")
    return files


def _file_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# --------------------------------------------------------------------------------------------
# key mapping (no assets needed)


def test_key_mapping_rules() -> None:
    assert taesd_key_to_diffusers("0.weight", part="encoder") == "encoder.layers.0.weight"
    assert taesd_key_to_diffusers("10.conv.0.weight", part="encoder") == "encoder.layers.10.conv.0.weight"
    # decoder index 0 is taesd.py's parameter-free Clamp: every decoder layer moves down by one
    assert taesd_key_to_diffusers("1.weight", part="decoder") == "decoder.layers.0.weight"
    assert taesd_key_to_diffusers("10.conv.0.weight", part="decoder") == "decoder.layers.9.conv.0.weight"
    assert taesd_key_to_diffusers("0.weight", part="decoder") is None
    assert taesd_key_to_diffusers("decoder.layers.0.weight", part="decoder") is None
    assert diffusers_key_to_taesd("decoder.layers.18.bias") == ("decoder", "19.bias")
    assert diffusers_key_to_taesd("encoder.layers.14.weight") == ("encoder", "14.weight")


def test_mapping_covers_autoencoder_tiny_exactly() -> None:
    """Inverse-mapping a fresh AutoencoderTiny's keys and mapping them back is the identity, per part."""
    from diffusers import AutoencoderTiny

    reference = AutoencoderTiny(**TAESD_CONFIGS["sd"]).state_dict()
    for part in ("encoder", "decoder"):
        as_file = {diffusers_key_to_taesd(k)[1]: v for k, v in reference.items() if k.startswith(part + ".")}
        assert len(as_file) == 67
        mapped = map_taesd_state_dict(as_file, part=part, reference=reference)  # type: ignore[arg-type]
        assert set(mapped) == {k for k in reference if k.startswith(part + ".")}
    assert not any(k.startswith("0.") for k in (diffusers_key_to_taesd(k)[1] for k in reference if k.startswith("decoder.")))


# --------------------------------------------------------------------------------------------
# strict loading of the real files


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_real_weights_strict_and_exact(variant: str) -> None:
    encoder_file, decoder_file = _require_taesd(variant)
    tiny = load_taesd(directory=TAESD_DIR, variant=variant)  # type: ignore[arg-type]
    config = tiny.config
    assert (config.latent_channels, config.scaling_factor, config.latent_magnitude, config.latent_shift) == (4, 1.0, 3, 0.5)
    assert tiny.dtype == torch.float32 and not tiny.training
    state = tiny.state_dict()
    encoder_state, decoder_state = _file_state(encoder_file), _file_state(decoder_file)
    assert len(state) == len(encoder_state) + len(decoder_state) == 134
    for key, value in encoder_state.items():
        torch.testing.assert_close(state[f"encoder.layers.{key}"], value.float(), rtol=0, atol=0)
    for key, value in decoder_state.items():
        index, rest = key.split(".", 1)
        torch.testing.assert_close(state[f"decoder.layers.{int(index) - 1}.{rest}"], value.float(), rtol=0, atol=0)
    as_bf16 = load_taesd(directory=TAESD_DIR, variant=variant, dtype=torch.bfloat16)  # type: ignore[arg-type]
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16.decoder.layers[0].weight, decoder_state["1.weight"])


def test_decoder_only_load_decodes_and_refuses_to_encode() -> None:
    _, decoder_file = _require_taesd("sd")
    for tiny in (load_taesd(decoder=decoder_file), load_taesd(directory=TAESD_DIR, load_encoder=False)):
        assert all(k.startswith("decoder.") for k in tiny.state_dict())
        with torch.inference_mode():
            image = tiny.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))).sample
        assert image.shape == (1, 3, 64, 64)
        with pytest.raises(TAESDError, match="decoder-only"):
            tiny.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="decoder"):
        load_taesd(encoder=taesd_files(TAESD_DIR, "sd")[0])
    with pytest.raises(ValueError, match="load_encoder=False"):
        load_taesd(decoder=decoder_file, encoder=taesd_files(TAESD_DIR, "sd")[0], load_encoder=False)


def test_removed_renamed_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    _, decoder_file = _require_taesd("sd")
    state = _file_state(decoder_file)

    removed = dict(state)
    del removed["10.conv.0.weight"]
    path = _save(removed, tmp_path / "removed.safetensors")
    with pytest.raises(TAESDError) as info:
        load_taesd(decoder=path)
    message = str(info.value)
    assert str(path) in message and "missing 1 key(s): 10.conv.0.weight (-> decoder.layers.9.conv.0.weight)" in message
    assert "unexpected" not in message

    renamed = dict(state)
    renamed["10.conv.1.weight"] = renamed.pop("10.conv.0.weight")
    path = _save(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(TAESDError, match=r"missing 1 key\(s\): 10\.conv\.0\.weight") as info:
        load_taesd(decoder=path)
    assert "unexpected 1 key(s): 10.conv.1.weight" in str(info.value)

    misshaped = dict(state)
    misshaped["19.weight"] = torch.zeros(4, 64, 3, 3, dtype=state["19.weight"].dtype)  # 4 output channels, not 3
    path = _save(misshaped, tmp_path / "misshaped.safetensors")
    with pytest.raises(TAESDError, match=r"wrong shape for 1 key\(s\): 19\.weight \(4, 64, 3, 3\)"):
        load_taesd(decoder=path)


def test_swapped_files_and_converted_checkpoints_are_refused() -> None:
    encoder_file, decoder_file = _require_taesd("sd")
    with pytest.raises(TAESDError, match="encoder file") as info:
        load_taesd(decoder=encoder_file)  # an encoder file where the decoder belongs
    assert str(encoder_file) in str(info.value) and "unexpected" in str(info.value)
    with pytest.raises(TAESDError) as info:
        load_taesd(encoder=decoder_file, decoder=decoder_file)
    assert str(decoder_file) in str(info.value) and "missing" in str(info.value)
    from diffusers import AutoencoderTiny

    converted = AutoencoderTiny(**TAESD_CONFIGS["sd"]).state_dict()
    with pytest.raises(TAESDError, match="from_pretrained"):
        map_taesd_state_dict(converted, part="decoder", reference=converted)


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(TAESDFileNotFoundError, match="TAESD sdxl file\\(s\\) not found") as info:
        load_taesd(directory=tmp_path, variant="sdxl")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, TAESDError)
    message = str(info.value)
    assert f"encoder {tmp_path / 'taesdxl_encoder.safetensors'}" in message
    assert f"decoder {tmp_path / 'taesdxl_decoder.safetensors'}" in message
    with pytest.raises(TAESDFileNotFoundError, match="decoder .*nothing.safetensors"):
        load_taesd(decoder=tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="variant"):
        load_taesd(directory=tmp_path, variant="sd3")  # type: ignore[arg-type]

    _, decoder_file = _require_taesd("sd")
    data = decoder_file.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TAESDError, match="truncated or corrupt") as info:
        load_taesd(decoder=truncated)
    assert str(truncated) in str(info.value)


# --------------------------------------------------------------------------------------------
# round trip on real photos


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """N_PHOTOS ImageNet photos spread over the classes, resized + center-cropped to SIZE, in [0, 1]."""
    from PIL import Image
    from torchvision import transforms

    files = _require_photos()
    picked = [files[i * len(files) // N_PHOTOS] for i in range(N_PHOTOS)]
    transform = transforms.Compose([transforms.Resize(SIZE), transforms.CenterCrop(SIZE), transforms.ToTensor()])
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in picked])


def _psnr(reconstructed: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    mse = (reconstructed - reference).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def _decode_01(tiny, latents: torch.Tensor) -> torch.Tensor:
    """AutoencoderTiny.decode gives about [-1, 1] (diffusers convention); back to [0, 1] as the pipelines do."""
    with torch.inference_mode():
        return (tiny.decode(latents).sample / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_psnr_proves_the_mapping(variant: str, photos: torch.Tensor, tmp_path: Path) -> None:
    _, decoder_file = _require_taesd(variant)
    tiny = load_taesd(directory=TAESD_DIR, variant=variant)  # type: ignore[arg-type]
    with torch.inference_mode():
        latents = tiny.encode(photos * 2 - 1).latents  # encoder takes [-1, 1]
    assert latents.shape == (N_PHOTOS, 4, SIZE // 8, SIZE // 8)
    assert 0.3 < latents.std().item() < 2.0  # raw SD latents (scaling_factor 1.0), not [0, 1]-packed ones
    correct = _psnr(_decode_01(tiny, latents), photos)

    # a wrong mapping the strict loader cannot detect: decoder file layers 3 (first block of the
    # first stage) and 15 (last block of the third stage) have identical key sets and shapes
    state = _file_state(decoder_file)
    exchange = {"3": "15", "15": "3"}
    swapped = {}
    for key, value in state.items():
        index, rest = key.split(".", 1)
        swapped[f"{exchange.get(index, index)}.{rest}"] = value
    assert swapped.keys() == state.keys()
    wrong_tiny = load_taesd(decoder=_save(swapped, tmp_path / "swapped.safetensors"), variant=variant)  # type: ignore[arg-type]
    wrong = _psnr(_decode_01(wrong_tiny, latents), photos)

    print(f"\n{variant}: PSNR correct {[round(v, 2) for v in correct.tolist()]} mean {correct.mean():.2f} dB; "
          f"layers 3<->15 swapped mean {wrong.mean():.2f} dB")
    assert correct.mean() >= MIN_MEAN_PSNR and correct.min() >= MIN_PHOTO_PSNR
    assert correct.mean() - wrong.mean() >= MIN_GAP_DB


# --------------------------------------------------------------------------------------------
# swap_decoder on a tiny StableDiffusionPipeline




def _tiny_pipeline(variant: str = "sd"):
    """A tiny random StableDiffusionPipeline (SD1 topology) or StableDiffusionXLPipeline (SDXL); 8x8 latents."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, tiny_sdxl_components

    if variant == "sdxl":
        components = tiny_sdxl_components(seed=0)
        config = tiny_config_dir(components, "sdxl")
        pipe = StableDiffusionXLPipeline(
            **components,
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(config / "tokenizer_2"),
            scheduler=EulerDiscreteScheduler.from_pretrained(config / "scheduler"),
            add_watermarker=False,
        )
    else:
        components = tiny_sd1_components(seed=0)
        config = tiny_config_dir(components, "sd1")
        pipe = StableDiffusionPipeline(
            **components,
            tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
            scheduler=PNDMScheduler.from_pretrained(config / "scheduler"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, **kwargs):
    return pipe(
        "a photo of a fish",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    ).images


def test_swap_decoder_shares_everything_but_the_vae(one_thread) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline

    pipe = _tiny_pipeline("sd")
    original_vae = pipe.vae
    vae_before = copy.deepcopy(original_vae.state_dict())
    config_before = dict(pipe.config)
    torch.manual_seed(1)
    tiny = AutoencoderTiny(**TAESD_CONFIGS["sd"]).eval()

    new = swap_decoder(pipe, tiny)
    assert type(new) is StableDiffusionPipeline and new is not pipe
    assert new.vae is tiny and new.vae_scale_factor == 8
    for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(new, name) is getattr(pipe, name), name
    assert new.safety_checker is None and new.config.requires_safety_checker is False
    assert new._progress_bar_config == {"disable": True}
    # the original pipeline is untouched
    assert pipe.vae is original_vae and isinstance(pipe.vae, AutoencoderKL)
    assert dict(pipe.config) == config_before
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), key

    images = _render(new, output_type="pt")
    assert images.shape == (1, 3, 64, 64)  # 8x8 latents, upsampled 8x by AutoencoderTiny
    assert images.min() >= 0 and images.max() <= 1
    assert _render(pipe, output_type="pt").shape == (1, 3, 64, 64)  # the original still renders with its VAE

    # from_pipe would cast shared components to float32; swap_decoder leaves dtypes alone
    torch.nn.Module.to(pipe.unet, torch.bfloat16)  # (ModelMixin.to logs a float32-modules warning)
    swap_decoder(pipe, tiny)
    assert pipe.unet.dtype == torch.bfloat16 and tiny.dtype == torch.float32

    with pytest.raises(TypeError, match="AutoencoderTiny"):
        swap_decoder(pipe, original_vae)


@pytest.mark.parametrize("variant", VARIANTS)
def test_swapped_pipeline_decodes_with_real_taesd(variant: str, one_thread) -> None:
    """The pipeline's output is exactly TAESD's decode of the UNet latents (no scaling), decoder-only load."""
    _, decoder_file = _require_taesd(variant)
    pipe = _tiny_pipeline(variant)
    tiny = load_taesd(decoder=decoder_file, variant=variant)  # type: ignore[arg-type]
    new = swap_decoder(pipe, tiny)
    assert type(new) is type(pipe) and new.vae is tiny and new.unet is pipe.unet
    if variant == "sdxl":
        assert new.text_encoder_2 is pipe.text_encoder_2 and new.watermark is None
        assert new.config.force_zeros_for_empty_prompt == pipe.config.force_zeros_for_empty_prompt
    latents = _render(pipe, output_type="latent")
    assert latents.shape == (1, 4, 8, 8)
    images = _render(new, output_type="pt")
    torch.testing.assert_close(images, _decode_01(tiny, latents))
    assert images.shape == (1, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
