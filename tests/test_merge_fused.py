"""The fused Triton kernel against the torch path and the per-key reference.

On CPU, Triton's interpreter (``TRITON_INTERPRET=1``, read when the kernel is first compiled) runs
the very same kernel, in a subprocess so that the in-process Triton state stays untouched. On a CUDA
machine the same checks also run on the GPU, compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimizer.architectures import load_layout
from optimizer.merge import MergeError, Merger, MergeRecipe, ParentBank, available_methods, get_method, merge_state_dicts_reference
from optimizer.merge.fused import fused_available, triton_importable
from tests.merge_cases import parents_for
from tests.synthetic import synthetic_state_dicts

LAYOUT = load_layout("sd1")
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed (it ships with torch's CUDA wheels)")

#: (method, n_parents, merge_vae, dtype name)
CASES = [
    ("weighted_sum", 2, False, "float32"),
    ("weighted_sum", 2, True, "float16"),
    ("weighted_sum", 3, False, "float32"),
    ("weighted_sum", 5, True, "float32"),
    ("add_difference", 3, False, "float16"),
    ("add_difference", 3, True, "float32"),
]
#: every other linear method of the registry (a new one is covered without editing this list)
CASES += [(name, parents_for(name), False, "float16") for name in available_methods()
          if get_method(name).coefficients is not None and name not in {case[0] for case in CASES}]


def _recipe(method: str, n: int, merge_vae: bool, seed: int) -> MergeRecipe:
    import random

    from optimizer.merge import get_method

    rng = random.Random(seed)
    params = {}
    for p in get_method(method).param_names(n):  # n > 2: the weights may sum past 1 (A's coefficient below 0)
        params[p] = {b: rng.uniform(0.0, 0.45) if method == "weighted_sum" and n > 2 else rng.uniform(0.0, 1.0) for b in LAYOUT.blocks}
    return MergeRecipe(method=method, params=params, seed=seed, merge_vae=merge_vae)


def check_cases(device: str) -> list[dict]:
    """Run every case on ``device``: fused vs torch backend vs reference; returns one record per case."""
    records = []
    for index, (method, n, merge_vae, dtype_name) in enumerate(CASES):
        dtype = getattr(torch, dtype_name)
        sds = synthetic_state_dicts(n=n, dtype=dtype, seed=100 + index)
        bank = ParentBank.build(state_dicts=sds, layout=LAYOUT, device=device)
        fused = Merger(bank, backend="triton")
        plain = Merger(bank, backend="torch")
        recipe = _recipe(method, n, merge_vae, seed=index)
        stats = fused.merge(recipe)
        plain.merge(recipe)
        fp64 = merge_state_dicts_reference(state_dicts=sds, layout=LAYOUT, recipe=recipe, dtype=torch.float64)
        worst_fused = worst_plain = 0.0
        for key, view in fused.state_dict().items():
            expected = fp64[key].to(device)
            if not view.is_floating_point():
                assert torch.equal(view, expected), key
                continue
            worst_fused = max(worst_fused, (view.double() - expected.double()).abs().max().item())
            worst_plain = max(worst_plain, (plain.state_dict()[key].double() - expected.double()).abs().max().item())
        # identities: coefficients (1, 0, ...) give parent 0 bit for bit, (0, 1, 0, ...) parent 1
        zero = MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=0.0, merge_vae=True)
        one = MergeRecipe.uniform(method="weighted_sum", layout=LAYOUT, alpha=1.0, merge_vae=True)
        identity = None
        if n == 2:
            fused.merge(zero)
            a_ok = torch.equal(fused.output, bank.buffers[0])
            fused.merge(one)
            identity = a_ok and torch.equal(fused.output, bank.buffers[1])
        # back to a merge without the VAE: the VAE must be parent 0's again
        fused.merge(MergeRecipe(method=recipe.method, params=recipe.params, merge_vae=False))
        vae = bank.segments["VAE"]
        vae_restored = torch.equal(vae.view(fused.output), vae.view(bank.buffers[0]))
        records.append(
            {
                "case": [method, n, merge_vae, dtype_name],
                "backend": stats.backend,
                "calls": stats.calls,
                "worst_fused": worst_fused,
                "worst_plain": worst_plain,
                "identity": identity,
                "vae_restored": vae_restored,
            }
        )
    return records


def _assert_records(records: list[dict]) -> None:
    assert len(records) == len(CASES)
    for r in records:
        method, n, merge_vae, dtype_name = r["case"]
        assert r["backend"] == "triton" and r["calls"] == 1, r
        # fp32 arithmetic, one rounding: never worse than the torch path (plus one fp16 ulp of slack)
        slack = 1e-3 if dtype_name == "float16" else 1e-6
        assert r["worst_fused"] <= r["worst_plain"] + slack, r
        assert r["worst_fused"] < (2e-3 if dtype_name == "float16" else 1e-5), r
        if n == 2:
            assert r["identity"] is True, r
        assert r["vae_restored"] is True, r


def test_fused_kernel_under_triton_interpreter_on_cpu():
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    code = "import json, tests.test_merge_fused as t; print('RESULT' + json.dumps(t.check_cases('cpu')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    _assert_records(json.loads(line[len("RESULT") :]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_kernel_on_cuda():
    _assert_records(check_cases("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_is_triton_on_cuda_and_tensor_methods_fall_back():
    sds = synthetic_state_dicts(n=3, dtype=torch.float16)
    bank = ParentBank.build(state_dicts=sds, layout=LAYOUT, device="cuda")
    merger = Merger(bank)
    assert merger.backend == "triton"
    stats = merger.merge(MergeRecipe.uniform(method="ties", layout=LAYOUT, alpha=1.0, density=0.3))
    assert stats.backend == "torch"
    ref = merge_state_dicts_reference(
        state_dicts=[{k: v.cuda() for k, v in sd.items()} for sd in sds],
        layout=LAYOUT,
        recipe=MergeRecipe.uniform(method="ties", layout=LAYOUT, alpha=1.0, density=0.3),
    )
    for key, view in merger.state_dict().items():
        torch.testing.assert_close(view, ref[key], rtol=2e-3, atol=2e-4)


def test_auto_backend_on_cpu_is_torch_and_forcing_triton_explains():
    if fused_available("cpu"):
        pytest.skip("this process runs under TRITON_INTERPRET")
    sds = synthetic_state_dicts(n=2)
    bank = ParentBank.build(state_dicts=sds, layout=LAYOUT)
    assert Merger(bank).backend == "torch"
    with pytest.raises(MergeError, match="needs CUDA and Triton"):
        Merger(bank, backend="triton")
    with pytest.raises(MergeError, match="backend must be"):
        Merger(bank, backend="cuda")  # type: ignore[arg-type]
