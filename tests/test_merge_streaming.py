"""Parents in host memory, streamed to the device per segment: the same weights as a device bank.

On this CPU machine "host" and "device" are the same memory, so this checks the staging logic (every
method, tensor-granularity spans inside staged segments, components, LoRA-free recipes); the
overlap of copies and merges and the device memory goal are CUDA-only: `bench/bench_streaming.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from optimizer.architectures.layout import load_layout
from optimizer.cli import app
from optimizer.merge import Merger, MergeRecipe, ParentBank, available_methods, get_method
from optimizer.merge.errors import MergeError
from optimizer.testing.tiny_models import tiny_ldm_state_dict, tiny_sd1_components, write_tiny_ldm

runner = CliRunner()
SD1 = load_layout("sd1")


@pytest.fixture(scope="module")
def parents() -> list[dict[str, torch.Tensor]]:
    return [tiny_ldm_state_dict(tiny_sd1_components(seed), "sd1") for seed in range(3)]


@pytest.mark.parametrize("method", available_methods())
def test_a_host_bank_merges_exactly_like_a_device_bank(parents, method: str) -> None:
    n = get_method(method).min_parents
    device = Merger(ParentBank.build(state_dicts=parents[:n], layout=SD1), backend="torch")
    host_bank = ParentBank.build(state_dicts=parents[:n], layout=SD1, placement="host")
    assert host_bank.placement == "host" and "host ->" in repr(host_bank)
    host = Merger(host_bank, backend="torch")
    blocks = list(SD1.blocks)
    for recipe in (
        MergeRecipe.uniform(method=method, layout=SD1, seed=5, merge_vae=True),
        MergeRecipe.uniform(method=method, layout=SD1, seed=5),  # the VAE copied back from parent 0
    ):
        if "alpha" in recipe.params:  # per-block values, so a segment mix-up shows
            recipe = recipe.model_copy(update={"params": {**recipe.params, "alpha": {b: i / len(blocks) for i, b in enumerate(blocks)}}})
        device.merge(recipe)
        host.merge(recipe)
        assert torch.equal(device.output, host.output), method


def test_a_host_bank_refuses_the_fused_kernel_and_unknown_placements(parents) -> None:
    bank = ParentBank.build(state_dicts=parents[:2], layout=SD1, placement="host")
    with pytest.raises(MergeError, match="streams them"):
        Merger(bank, backend="triton")
    from optimizer.merge.errors import ParentMismatchError

    with pytest.raises(ParentMismatchError, match="placement"):
        ParentBank.build(state_dicts=parents[:2], layout=SD1, placement="disk")


def test_merge_cli_with_host_placement_writes_the_same_file(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    files = [write_tiny_ldm(tmp_path / f"{i}.safetensors", tiny_sd1_components(i), "sd1") for i in range(2)]
    for placement in ("device", "host"):
        result = runner.invoke(app, ["merge", *map(str, files), "--alpha", "0.3", "--placement", placement, "-o", str(tmp_path / f"{placement}.safetensors")])
        assert result.exit_code == 0, result.output
    a, b = load_file(str(tmp_path / "device.safetensors")), load_file(str(tmp_path / "host.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = runner.invoke(app, ["merge", *map(str, files), "--placement", "disk", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "placement" in result.output and not (tmp_path / "x.safetensors").exists()
