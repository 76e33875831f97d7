"""Checkpoint loading and saving: formats, safety, hashes, atomic writes, metadata."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from optimizer.checkpoint.hashing import legacy_hash, sha256_file, short_hash
from optimizer.checkpoint.load import load_checkpoint
from optimizer.checkpoint.save import merge_metadata, save_safetensors
from optimizer.checkpoint.types import CheckpointError
from tests.synthetic import random_sd1_state_dict


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))


def _state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return random_sd1_state_dict(seed=seed, dtype=dtype)


def test_safetensors_round_trip_keeps_tensors_dtype_and_metadata(tmp_path: Path) -> None:
    sd = _state_dict(dtype=torch.float16)
    path = tmp_path / "a.safetensors"
    save_file(sd, str(path), metadata={"note": "x"})
    ckpt = load_checkpoint(path)
    assert ckpt.architecture == "sd1" and ckpt.source_format == "safetensors"
    assert ckpt.metadata == {"note": "x"}
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in sd.items())
    assert {t.dtype for t in ckpt.state_dict.values()} == {torch.float16}
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ckpt.short_hash == ckpt.sha256[:10] == short_hash(ckpt.sha256)
    as_bf16 = load_checkpoint(path, dtype="bf16")
    assert {t.dtype for t in as_bf16.state_dict.values()} == {torch.bfloat16}


def test_ema_schedule_buffers_and_position_ids_are_dropped(tmp_path: Path) -> None:
    sd = _state_dict()
    extras = {
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(3),
        "model_ema.decay": torch.tensor(0.999),
        "alphas_cumprod": torch.zeros(1000),
        "betas": torch.zeros(1000),
        "logvar": torch.zeros(1000),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    path = tmp_path / "train.safetensors"
    save_file({**sd, **extras}, str(path))
    assert set(load_checkpoint(path).state_dict) == set(sd)


def test_ckpt_loads_weights_only_and_unwraps_state_dict(tmp_path: Path) -> None:
    sd = _state_dict()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10, "epoch": 1}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.source_format == "ckpt" and set(ckpt.state_dict) == set(sd)


class _Payload:
    def __reduce__(self):  # a pickle that would run code when loaded
        return (os.system, ("touch /tmp/evomerge-pwned",))


def test_pickle_with_a_payload_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _state_dict(), "callback": _Payload()}, path)
    marker = Path("/tmp/evomerge-pwned")
    marker.unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="refused: this pickle needs code execution"):
        load_checkpoint(path)
    assert not marker.exists()
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="refused|not a readable"):
        load_checkpoint(raw)
    assert not marker.exists()


def test_truncated_and_garbage_files_are_clear_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(_state_dict(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(garbage)
    zeros = tmp_path / "zeros.ckpt"
    zeros.write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a readable checkpoint|refused"):
        load_checkpoint(zeros)
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.gguf'"):
        (tmp_path / "m.gguf").write_bytes(b"x")
        load_checkpoint(tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_a_lora_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="no denoiser keys"):
        load_checkpoint(path)


def test_hashes_match_a1111_definitions(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(0x100000 + 0x20000)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()  # served from the cache
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_save_is_atomic_and_keeps_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    with pytest.raises(CheckpointError, match="metadata values must be strings"):
        save_safetensors(state_dict=_state_dict(), path=out, metadata={"x": 1})  # type: ignore[dict-item]
    with pytest.raises(Exception):
        save_safetensors(state_dict={"a": torch.zeros(2), "b": "not a tensor"}, path=out)  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError, match="does not exist"):
        save_safetensors(state_dict=_state_dict(), path=tmp_path / "nope" / "m.safetensors")
    buffer = torch.arange(30, dtype=torch.float32)
    views = {"a": buffer[:15].view(3, 5), "b": buffer[15:].view(3, 5)}  # shared storage, like the kernel's output
    save_safetensors(state_dict=views, path=out, metadata={"k": "v"})
    loaded = load_file(str(out))
    assert torch.equal(loaded["b"], views["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["merged.safetensors"]


def test_merge_metadata_is_a1111_shaped(tmp_path: Path) -> None:
    paths = []
    for i, name in enumerate(["a", "b"]):
        path = tmp_path / f"{name}.safetensors"
        meta = {"sd_merge_recipe": json.dumps({"type": "webui"})} if i == 1 else None
        save_file(_state_dict(i), str(path), metadata=meta)
        paths.append(path)
    parents = [load_checkpoint(p) for p in paths]
    meta = merge_metadata(recipe={"method": "weighted_sum"}, parents=parents)
    recipe = json.loads(meta["sd_merge_recipe"])
    models = json.loads(meta["sd_merge_models"])
    assert recipe["type"] == "evomerge" and recipe["method"] == "weighted_sum"
    assert [p["sha256"] for p in recipe["parents"]] == [p.sha256 for p in parents]
    assert models[parents[0].sha256]["name"] == "a"
    assert models[parents[0].sha256]["legacy_hash"] == legacy_hash(paths[0])
    assert models[parents[1].sha256]["sd_merge_recipe"] == {"type": "webui"}
