"""evomerge extract-lora against diffusers: the extracted kohya file, loaded with
``load_lora_weights`` and fused into the base, gives the merged model's weights (exactly at full
rank; at a lower rank with the per-layer error the file records)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, tiny_sd2_components, tiny_sdxl_components, write_tiny_ldm

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
BUILD = {"sd1": tiny_sd1_components, "sd2": tiny_sd2_components, "sdxl": tiny_sdxl_components}
#: the HF CLIP towers (SDXL's second tower is OpenCLIP in LDM files, q/k/v fused: not a LoRA target)
TOWERS = {"sd1": ("text_encoder",), "sd2": (), "sdxl": ("text_encoder",)}
#: what kohya's networks adapt in a UNet (tests/ reads diffusers names)
KOHYA_UNET = (".attentions.", ".resnets.", ".downsamplers.", ".upsamplers.")


def _pipeline(architecture: str, path: Path, config: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if architecture == "sdxl" else StableDiffusionPipeline
    return cls.from_single_file(str(path), config=str(config), local_files_only=True)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def merge(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    architecture = request.param
    tmp = tmp_path_factory.mktemp(f"extract-{architecture}")
    a, b = BUILD[architecture](0), BUILD[architecture](1)
    config = tiny_config_dir(a, architecture)
    base, other = write_tiny_ldm(tmp / "base.safetensors", a, architecture), write_tiny_ldm(tmp / "other.safetensors", b, architecture)
    merged = tmp / "merged.safetensors"
    result = runner.invoke(app, ["merge", str(base), str(other), "--mbw" if architecture != "sdxl" else "--alpha",
                                 "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0,0.2,0.4,0.6,0.8,1,0.5" if architecture != "sdxl" else "0.3",
                                 "--config", str(config), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    return {"architecture": architecture, "tmp": tmp, "config": config, "base": base, "merged": merged}


def _fused(merge: dict, lora: Path) -> dict[str, dict[str, torch.Tensor]]:
    pipe = _pipeline(merge["architecture"], merge["base"], merge["config"])
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=1.0)
    return {c: {k.replace(".base_layer", ""): v for k, v in getattr(pipe, c).state_dict().items() if "lora" not in k}
            for c in ("unet", *TOWERS[merge["architecture"]])}


def _adapted(merge: dict):
    merged, base = _pipeline(merge["architecture"], merge["merged"], merge["config"]), _pipeline(merge["architecture"], merge["base"], merge["config"])
    for c in ("unet", *TOWERS[merge["architecture"]]):
        want, start = getattr(merged, c).state_dict(), getattr(base, c).state_dict()
        for k, v in want.items():
            if v.ndim in (2, 4) and "embedding" not in k and not torch.equal(v, start[k]) and (c != "unet" or any(p in k for p in KOHYA_UNET)):
                yield c, k, start[k], v


def test_a_full_rank_lora_applied_by_diffusers_gives_the_merged_weights(merge: dict) -> None:
    lora = merge["tmp"] / "full.safetensors"
    result = runner.invoke(app, ["extract-lora", str(merge["merged"]), str(merge["base"]), "--rank", "4096", "--dtype", "fp32",
                                 "--config", str(merge["config"]), "-o", str(lora)])
    assert result.exit_code == 0, result.output
    fused = _fused(merge, lora)
    checked = 0
    for component, key, _, want in _adapted(merge):
        torch.testing.assert_close(fused[component][key], want, atol=2e-5, rtol=1e-4, msg=lambda m, k=key: f"{component}.{k}: {m}")
        checked += 1
    assert checked > 50
    with safe_open(str(lora), "pt") as handle:
        summary = json.loads(handle.metadata()["evomerge_extract"])
        convs = [k for k in handle.keys() if k.endswith("lora_down.weight") and handle.get_slice(k).get_shape().__len__() == 4]
    assert summary["max_relative_error"] < 1e-5 and convs  # conv layers are in the file (LoCon)
    assert summary["not_captured"] > 0  # biases and norms changed too: a LoRA cannot hold them, and the file says so


def test_a_low_rank_lora_has_the_error_it_records(merge: dict) -> None:
    lora = merge["tmp"] / "rank2.safetensors"
    result = runner.invoke(app, ["extract-lora", str(merge["merged"]), str(merge["base"]), "--rank", "2", "--dtype", "fp32",
                                 "--config", str(merge["config"]), "-o", str(lora)])
    assert result.exit_code == 0, result.output
    with safe_open(str(lora), "pt") as handle:
        summary = json.loads(handle.metadata()["evomerge_extract"])
    fused = _fused(merge, lora)
    errors = [float((fused[c][k] - want).norm() / (want - start).norm()) for c, k, start, want in _adapted(merge)]
    assert max(errors) == pytest.approx(summary["max_relative_error"], rel=1e-3)
    assert sum(errors) / len(errors) == pytest.approx(summary["mean_relative_error"], rel=1e-3)
    assert 0.05 < summary["mean_relative_error"] < 1.0


def test_bad_input_is_one_line(merge: dict, tmp_path: Path) -> None:
    cases = [
        (["extract-lora", str(merge["base"]), str(merge["base"]), "-o", str(tmp_path / "x.safetensors")], "nothing to extract"),
        (["extract-lora", str(merge["merged"]), str(merge["base"]), "--dtype", "fp8", "-o", str(tmp_path / "x.safetensors")], "--dtype 'fp8'"),
        (["extract-lora", str(merge["merged"]), str(merge["base"]), "-o", str(tmp_path / "x.pt")], ".safetensors file"),
        (["extract-lora", str(merge["merged"]), str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "x.safetensors")], "nope.safetensors"),
    ]
    for args, needle in cases:
        result = runner.invoke(app, [*args, "--config", str(merge["config"])])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], (args, result.output)
    assert list(tmp_path.iterdir()) == []


def test_a_dit_model_is_refused_with_one_line(tmp_path: Path) -> None:
    from optimizer.testing.tiny_dit import tiny_dit_components, write_tiny_dit_single_file

    files = [write_tiny_dit_single_file(tmp_path / f"{s}.safetensors", tiny_dit_components("flux-schnell", seed=s), "flux-schnell") for s in (0, 1)]
    result = runner.invoke(app, ["extract-lora", *map(str, files), "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "flux is not supported yet" in result.output and not (tmp_path / "x.safetensors").exists()
