"""What the CLI fault tests share: the tiny workspace of good and bad files, the one-trial zoo study,
and :func:`refuse`, which checks a clean refusal (exit 2, one ``error:`` line, nothing created,
nothing touched, no temporary left behind)."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, write_tiny_ldm
from tests.zoo_study import zoo_study_data

runner = CliRunner()
TEMPORARY = re.compile(r"\.evomerge-.*\.tmp$|\.tmp-|\.old-")


@dataclass
class Workspace:
    root: Path
    p0: Path
    p1: Path
    config: Path
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / name


def bad_files(root: Path, p1: Path) -> dict[str, Path]:
    state = load_file(str(p1))
    key = next(k for k in sorted(state) if "input_blocks.1" in k and state[k].is_floating_point())
    out: dict[str, Path] = {}
    for name, change in {
        "nan": lambda t: t.view(-1).__setitem__(0, float("nan")),
        "inf": lambda t: t.view(-1).__setitem__(-1, float("inf")),
    }.items():
        bad = {k: v.clone() for k, v in state.items()}
        change(bad[key])
        out[name] = root / f"{name}.safetensors"
        save_file(bad, str(out[name]))
    as_int = dict(state)
    as_int[key] = torch.zeros(state[key].shape, dtype=torch.int32)
    out["int"] = root / "int.safetensors"
    save_file(as_int, str(out["int"]))
    shape = dict(state)
    shape[key] = torch.zeros(state[key].numel() + 1)
    out["shape"] = root / "shape.safetensors"
    save_file(shape, str(out["shape"]))
    out["empty"] = root / "empty.safetensors"
    out["empty"].write_bytes(b"")
    out["random"] = root / "random.safetensors"
    out["random"].write_bytes(os.urandom(4096))
    out["truncated"] = root / "truncated.safetensors"
    out["truncated"].write_bytes(p1.read_bytes()[:5000])
    out["text_ckpt"] = root / "notes.ckpt"
    out["text_ckpt"].write_text("this is not a checkpoint\n")
    out["unknown_suffix"] = root / "model.gguf"
    out["unknown_suffix"].write_bytes(b"GGUF" + os.urandom(64))

    class Payload:  # a pickle that would run code: os.system on load
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    out["payload"] = root / "payload.ckpt"
    torch.save({"state_dict": {"x": Payload()}}, out["payload"])  # as a malicious .ckpt is made
    out["fifo"] = root / "pipe.safetensors"
    os.mkfifo(out["fifo"])
    out["devzero"] = root / "zero.ckpt"
    out["devzero"].symlink_to("/dev/zero")
    out["not_diffusers"] = root / "just-a-folder"
    out["not_diffusers"].mkdir()
    (out["not_diffusers"] / "readme.txt").write_text("hello\n")
    images = root / "images"
    images.mkdir()
    (images / "a.png").write_text("not an image at all\n")
    out["fake_png"] = images
    noise = root / "noise-images"
    noise.mkdir()
    (noise / "a.png").write_bytes(os.urandom(2048))
    out["random_png"] = noise
    good = root / "good-images"
    good.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (24 + 8 * i, 32), (40 * i, 90, 200)).save(good / f"{i}.png")
    out["good_png"] = good
    out["empty_dir"] = root / "empty-dir"
    out["empty_dir"].mkdir()
    return out


def tree_digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("\n".join(f"{p.relative_to(path)}:{tree_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.is_dir() else set()


def check_refusal(code: int, stderr: str, stdout: str = "") -> str:
    """Exit code 2, one ``error:`` line on stderr, no traceback anywhere; returns the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, (code, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr + stdout, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def refuse(args: list, *, absent: tuple[Path, ...] = (), untouched: tuple[Path, ...] = (), watch: tuple[Path, ...] = (),
           match: str | None = None) -> str:
    """Run ``evomerge args`` in process and check a clean refusal (see the module docstring)."""
    digests = {p: tree_digest(p) for p in untouched}
    folders = {f: listing(f) for f in watch}
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        pytest.fail("".join(traceback.format_exception(result.exception)))
    line = check_refusal(result.exit_code, result.stderr, result.stdout)
    for path in absent:
        assert not path.exists(), f"{path} was created"
    for path, digest in digests.items():
        assert path.exists() and tree_digest(path) == digest, f"{path} was changed"
    for folder, before in folders.items():
        after = listing(folder)
        assert after == before, f"{folder}: {sorted(after ^ before)} appeared or vanished"
        assert not [n for n in after if TEMPORARY.search(n)]
    if match is not None:
        assert re.search(match, line), line
    return line




def build_workspace(root: Path) -> Workspace:
    """Two tiny SD1 parents, their diffusers config folder and the bad files (:func:`bad_files`) in ``root``."""
    components = tiny_sd1_components(seed=0)
    p0 = write_tiny_ldm(root / "p0.safetensors", components, "sd1")
    p1 = write_tiny_ldm(root / "p1.safetensors", tiny_sd1_components(seed=1), "sd1")
    work = Workspace(root=root, p0=p0, p1=p1, config=tiny_config_dir(components, "sd1"))
    work.files = bad_files(root, p1)
    return work


def fault_study_file(folder: Path, **overrides) -> Path:
    """A one-trial zoo study file (:func:`tests.zoo_study.zoo_study_data` with one global alpha)."""
    data = zoo_study_data(folder, **{"name": "faults", "search_space": {"alpha": {"share": "global"}}, "budget": {"trials": 1},
                                  "render": {"batch_size": 3, "grid_images": 2}, **overrides})
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_done_study(root: Path) -> dict[str, Path]:
    """A finished one-trial study in ``root``, and a study file that differs from it."""
    study_file = fault_study_file(root)
    out = root / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    other = fault_study_file(root, name="other", sampler={"name": "tpe", "seed": 2})
    return {"root": root, "file": study_file, "out": out, "other": other}
