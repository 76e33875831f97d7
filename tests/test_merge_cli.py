"""End to end: real (tiny) SD checkpoints through the CLI, the kernel, and diffusers' loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optimizer.architectures import load_layout, parse_mbw
from optimizer.checkpoint.keymap_diffusers import ldm_to_diffusers
from optimizer.checkpoint.load import load_checkpoint
from optimizer.cli import app
from optimizer.merge import MergeRecipe, available_methods, get_method, merge_state_dicts_reference
from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, tiny_sdxl_components, write_tiny_diffusers, write_tiny_ldm
from tests.merge_cases import parents_for

MBW = "1,0,0,0,0.25,0,0,0,0,0,0,0,0,0.5,1,1,1,1,0.75,1,1,1,1,1,1,0.1"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    components = [tiny_sd1_components(seed=s) for s in range(3)]
    paths = {f"p{s}": write_tiny_ldm(root / f"p{s}.safetensors", c, "sd1") for s, c in enumerate(components[:2])}
    paths["d2"] = write_tiny_diffusers(root / "d2", components[2], "sd1")
    paths["config"] = tiny_config_dir(components[0], "sd1")
    paths["xl"] = write_tiny_ldm(root / "xl.safetensors", tiny_sdxl_components(seed=0), "sdxl")
    paths["root"] = root
    return paths


def _run(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_inspect_reports_architecture_blocks_and_hashes(tiny: dict[str, Path]) -> None:
    code, out = _run("inspect", tiny["p0"], "--json")
    assert code == 0, out
    info = json.loads(out)
    ckpt = load_checkpoint(tiny["p0"])
    assert info["architecture"] == "sd1" and info["sha256"] == ckpt.sha256 and info["short_hash"] == ckpt.sha256[:10]
    assert list(info["blocks"]) == [*load_layout("sd1").blocks, "VAE"]
    assert sum(b["keys"] for b in info["blocks"].values()) == info["tensors"] == len(ckpt.state_dict)
    assert sum(b["params"] for b in info["blocks"].values()) == info["parameters"]
    assert all(b["keys"] > 0 for b in info["blocks"].values())
    code, table = _run("inspect", tiny["d2"])
    assert code == 0 and "sd1" in table and "format diffusers" in table and "OUT11" in table


def test_mbw_merge_loads_through_from_single_file_and_equals_the_reference(tiny: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    out = tiny["root"] / "mbw.safetensors"
    code, text = _run("merge", tiny["p0"], tiny["p1"], "--mbw", MBW, "-o", out)
    assert code == 0, text
    layout = load_layout("sd1")
    parents = [load_checkpoint(tiny["p0"]), load_checkpoint(tiny["p1"])]
    recipe = MergeRecipe.from_mbw(method="weighted_sum", layout=layout, mbw=MBW)
    expected = merge_state_dicts_reference(state_dicts=[p.state_dict for p in parents], layout=layout, recipe=recipe)
    saved = load_file(str(out))
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
    # identities inside one file: alpha 0 blocks are A, alpha 1 blocks are B, the VAE is A's
    a, b = parents[0].state_dict, parents[1].state_dict
    assert torch.equal(saved["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"], a["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"])
    assert torch.equal(saved["model.diffusion_model.output_blocks.0.0.in_layers.0.weight"], b["model.diffusion_model.output_blocks.0.0.in_layers.0.weight"])
    assert torch.equal(saved["first_stage_model.decoder.conv_in.weight"], a["first_stage_model.decoder.conv_in.weight"])

    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny["config"]), local_files_only=True)
    want = ldm_to_diffusers(state_dict=expected, architecture="sd1", config_dir=tiny["config"])
    got = pipe.unet.state_dict()
    assert set(got) == set(want["unet"]) and all(torch.equal(got[k], v) for k, v in want["unet"].items())
    got_vae = pipe.vae.state_dict()
    assert all(torch.equal(got_vae[k], v) for k, v in want["vae"].items())

    metadata = load_checkpoint(out).metadata
    recipe_meta = json.loads(metadata["sd_merge_recipe"])
    assert recipe_meta["method"] == "weighted_sum" and recipe_meta["params"]["alpha"] == parse_mbw(MBW, layout=layout)
    assert [p["sha256"] for p in recipe_meta["parents"]] == [p.sha256 for p in parents]
    assert set(json.loads(metadata["sd_merge_models"])) == {p.sha256 for p in parents}


def test_alpha_identities_through_the_cli(tiny: dict[str, Path]) -> None:
    a = load_file(str(tiny["p0"]))
    b = load_checkpoint(tiny["p1"]).state_dict
    for alpha, want in (("0", a), ("1", b)):
        out = tiny["root"] / f"alpha{alpha}.safetensors"
        code, text = _run("merge", tiny["p0"], tiny["p1"], "--alpha", alpha, "--merge-vae", "-o", out)
        assert code == 0, text
        got = load_file(str(out))
        assert all(torch.equal(got[k], want[k]) for k in got)
    out = tiny["root"] / "adddiff.safetensors"
    code, text = _run("merge", tiny["p0"], tiny["p1"], tiny["d2"], "--method", "add_difference", "--alpha", "0", "-o", out)
    assert code == 0, text
    got = load_file(str(out))
    assert all(torch.equal(got[k], a[k]) for k in got)


def test_diffusers_output_loads_with_from_pretrained(tiny: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    out = tiny["root"] / "merged-diffusers"
    code, text = _run("merge", tiny["d2"], tiny["p0"], "--method", "slerp", "--alpha", "0.3", "--format", "diffusers", "-o", out)
    assert code == 0, text
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded = load_checkpoint(out).state_dict
    parents = [load_checkpoint(tiny["d2"]), load_checkpoint(tiny["p0"])]
    layout = load_layout("sd1")
    expected = merge_state_dicts_reference(
        state_dicts=[p.state_dict for p in parents], layout=layout, recipe=MergeRecipe.uniform(method="slerp", layout=layout, alpha=0.3)
    )
    assert all(torch.allclose(reloaded[k], expected[k], atol=1e-6) for k in expected)
    want = ldm_to_diffusers(state_dict=expected, architecture="sd1", config_dir=tiny["d2"])["unet"]
    got = pipe.unet.state_dict()
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in want.items())


@pytest.mark.parametrize("method", available_methods())
def test_every_registered_method_merges_through_the_cli_as_the_reference(tiny: dict[str, Path], method: str) -> None:
    """``evomerge merge --method NAME`` with the method's defaults (seed 0) on real tiny files equals
    the per-key reference; iterates the registry, so a new method is covered here too."""
    n = parents_for(method)
    files = [tiny["p0"], tiny["p1"], tiny["d2"], tiny["p0"], tiny["p1"]][:n]
    out = tiny["root"] / f"every-{method}.safetensors"
    weights = {p: 0.2 for p in get_method(method).per_parent[1 : n - 1]}  # per-parent weights past the first are never implied
    code, text = _run("merge", *files, "--method", method, *[a for p, v in weights.items() for a in ("--param", f"{p}={v}")], "-o", out)
    assert code == 0, text
    layout = load_layout("sd1")
    expected = merge_state_dicts_reference(state_dicts=[load_checkpoint(f).state_dict for f in files], layout=layout,
                                           recipe=MergeRecipe.uniform(method=method, layout=layout, **weights))
    got = load_file(str(out))
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6, rtol=1e-5) for k in expected), method


def _assert_no_output(out: Path) -> None:
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(out.name) or p.name.startswith(f".{out.name}")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("mixed", "cannot merge"),
        ("shape", "shape mismatch at model.diffusion_model.out.2.weight"),
        ("truncated", "truncated or corrupt"),
        ("pickle", "refused"),
        ("one", "at least two"),
        ("mbw", "takes 26 MBW values"),
        ("method", "unknown merge method|known"),
        ("param", "density"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tiny: dict[str, Path], case: str, message: str) -> None:
    root = tiny["root"]
    out = root / f"bad-{case}.safetensors"
    args: list[str | Path] = ["merge", tiny["p0"], tiny["p1"], "-o", out]
    if case == "mixed":
        args[2] = tiny["xl"]
    elif case == "shape":
        sd = load_file(str(tiny["p1"]))
        sd["model.diffusion_model.out.2.weight"] = torch.zeros(5, *sd["model.diffusion_model.out.2.weight"].shape[1:])
        save_file(sd, str(root / "shape.safetensors"))
        args[2] = root / "shape.safetensors"
    elif case == "truncated":
        data = tiny["p1"].read_bytes()
        (root / "trunc.safetensors").write_bytes(data[: len(data) // 2])
        args[2] = root / "trunc.safetensors"
    elif case == "pickle":
        import os

        class Payload:
            def __reduce__(self):
                return (os.system, ("true",))

        torch.save({"state_dict": {}, "x": Payload()}, root / "evil.ckpt")
        args[2] = root / "evil.ckpt"
    elif case == "one":
        args = ["merge", tiny["p0"], "-o", out]
    elif case == "mbw":
        args += ["--mbw", "0.5,0.5"]
    elif case == "method":
        args += ["--method", "magic"]
    elif case == "param":
        args += ["--method", "ties", "--param", "density=0"]
    code, text = _run(*args)
    assert code == 2, text
    assert any(m in text for m in message.split("|")), text
    _assert_no_output(out)


def test_existing_output_needs_overwrite(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "exists.safetensors"
    out.write_bytes(b"keep me")
    code, text = _run("merge", tiny["p0"], tiny["p1"], "--alpha", "0.5", "-o", out)
    assert code == 2 and "exists" in text
    assert out.read_bytes() == b"keep me"
    code, text = _run("merge", tiny["p0"], tiny["p1"], "--alpha", "0.5", "-o", out, "--overwrite")
    assert code == 0, text
    assert load_checkpoint(out).architecture == "sd1"


def test_sd2_single_file_with_unused_last_layer_merges_with_a_diffusers_folder(tmp_path: Path) -> None:
    """A1111 SD2 files carry the last OpenCLIP layer and text_projection, which diffusers folders
    drop (SD2 conditions on the penultimate layer): the two formats merge, the unused keys are
    copied from the single file, and a genuinely different key set is still refused."""
    from optimizer.testing.tiny_models import tiny_ldm_state_dict, tiny_sd2_components

    components = [tiny_sd2_components(seed=s) for s in range(2)]
    a1111 = tiny_ldm_state_dict(components[0], "sd2")
    last = {k: v for k, v in a1111.items() if k.startswith("cond_stage_model.model.transformer.resblocks.1.")}
    assert last, "the tiny SD2 text tower has two layers"
    for key, value in last.items():
        a1111[key.replace("resblocks.1.", "resblocks.2.")] = value.clone() + 1.0
    a1111["cond_stage_model.model.text_projection"] = torch.randn(48, 48)
    single = tmp_path / "sd2-a1111.safetensors"
    save_file({k: v.contiguous() for k, v in a1111.items()}, str(single))
    folder = write_tiny_diffusers(tmp_path / "sd2-diffusers", components[1], "sd2")

    out = tmp_path / "merged.safetensors"
    code, text = _run("merge", folder, single, "--alpha", "0.5", "-o", out)
    assert code == 0, text
    assert "added" in text and "inference never reads" in text and "sd2-a1111" in text
    merged = load_file(str(out))
    assert set(merged) == set(a1111)
    assert torch.equal(merged["cond_stage_model.model.text_projection"], a1111["cond_stage_model.model.text_projection"])
    key = next(k for k in a1111 if k.startswith("cond_stage_model.model.transformer.resblocks.2."))
    assert torch.equal(merged[key], a1111[key])
    shared = "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight"
    diffusers_side = load_checkpoint(folder).state_dict[shared]
    torch.testing.assert_close(merged[shared], 0.5 * diffusers_side + 0.5 * a1111[shared])

    # a missing layer that is not the last one is a real difference: refused, nothing written
    broken = {k: v for k, v in a1111.items() if not k.startswith("cond_stage_model.model.transformer.resblocks.0.")}
    bad = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in broken.items()}, str(bad))
    out2 = tmp_path / "never.safetensors"
    code, text = _run("merge", single, bad, "--alpha", "0.5", "-o", out2)
    assert code != 0 and "different keys" in text and "resblocks.0." in text
    assert not out2.exists()


def test_the_same_merge_gives_the_same_file_byte_for_byte(tiny: dict[str, Path]) -> None:
    """The safetensors library writes metadata from a hash map (a new key order each run); the
    header is rewritten in a fixed order, so the same inputs give the same sha256 (DARE included:
    its masks come from the recipe's seed)."""
    import hashlib

    digests = []
    for run in range(2):
        out = tiny["root"] / f"dare-{run}.safetensors"
        code, text = _run("merge", tiny["p0"], tiny["p1"], "--method", "dare", "--param", "drop_rate=0.5", "-o", out)
        assert code == 0, text
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    import struct

    data = (tiny["root"] / "dare-0.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])  # the fixed order on disk
    assert load_file(str(tiny["root"] / "dare-0.safetensors")).keys() == load_file(str(tiny["p0"])).keys()

