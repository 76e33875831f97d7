"""Bad input and faults through the CLI, as a new user would meet them.

Every case is refused the same way: exit code 2, exactly one line on stderr starting with
``error:``, no traceback, nothing at the output path, no temporary left behind, and every file
that was in the way byte for byte as it was. Bad files are generated in a temporary folder.
Read-only and full file systems are small tmpfs mounts (root only; skipped otherwise). Cases that
could hang (a FIFO, ``/dev/zero``) run in a subprocess with a timeout.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.testing.tiny_models import tiny_config_dir, tiny_sd1_components, write_tiny_ldm
from optimizer.zoo import paths
from tests.study_cli import evomerge_command, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ZOO = paths.default_zoo_dir()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"
TEMPORARY = re.compile(r"\.evomerge-.*\.tmp$|\.tmp-|\.old-")


# ------------------------------------------------------------------------------------- fixtures
@dataclass
class Workspace:
    root: Path
    p0: Path
    p1: Path
    config: Path
    files: dict[str, Path] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.root / name


def _bad_files(root: Path, p1: Path) -> dict[str, Path]:
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


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("faults")
    components = tiny_sd1_components(seed=0)
    p0 = write_tiny_ldm(root / "p0.safetensors", components, "sd1")
    p1 = write_tiny_ldm(root / "p1.safetensors", tiny_sd1_components(seed=1), "sd1")
    work = Workspace(root=root, p0=p0, p1=p1, config=tiny_config_dir(components, "sd1"))
    work.files = _bad_files(root, p1)
    return work


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256("\n".join(f"{p.relative_to(path)}:{_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file()).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listing(folder: Path) -> set[str]:
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
    digests = {p: _digest(p) for p in untouched}
    folders = {f: _listing(f) for f in watch}
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        pytest.fail("".join(traceback.format_exception(result.exception)))
    line = check_refusal(result.exit_code, result.stderr, result.stdout)
    for path in absent:
        assert not path.exists(), f"{path} was created"
    for path, digest in digests.items():
        assert path.exists() and _digest(path) == digest, f"{path} was changed"
    for folder, before in folders.items():
        after = _listing(folder)
        assert after == before, f"{folder}: {sorted(after ^ before)} appeared or vanished"
        assert not [n for n in after if TEMPORARY.search(n)]
    if match is not None:
        assert re.search(match, line), line
    return line


# ------------------------------------------------------------------------------ merge / inspect
Case = Callable[[Workspace], dict]


def _merge(w: Workspace, *extra, out: str = "out.safetensors") -> dict:
    target = w.path(out)
    return {"args": ["merge", *extra, "-o", target], "absent": (target,), "watch": (w.root,)}


MERGE_CASES: dict[str, tuple[Case, str]] = {
    "alpha above 1": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "5"), r"alpha.*\[0, 1\].*5"),
    "alpha below 0": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "-0.5"), r"alpha.*\[0, 1\]"),
    "slerp alpha above 1": (lambda w: _merge(w, w.p0, w.p1, "--method", "slerp", "--alpha", "1.5"), r"alpha"),
    "mbw value out of range": (lambda w: _merge(w, w.p0, w.p1, "--mbw", ",".join(["0.5"] * 25 + ["7"])), r"\[0, 1\]"),
    "mbw wrong count": (lambda w: _merge(w, w.p0, w.p1, "--mbw", "0.5,0.5,0.5"), r"MBW|values"),
    "ties density 0": (lambda w: _merge(w, w.p0, w.p1, "--method", "ties", "--param", "density=0"), r"density"),
    "unknown method": (lambda w: _merge(w, w.p0, w.p1, "--method", "average"), r"average"),
    "unknown parameter": (lambda w: _merge(w, w.p0, w.p1, "--param", "beta2=0.3"), r"beta2"),
    "bad parameter text": (lambda w: _merge(w, w.p0, w.p1, "--param", "alpha"), r"NAME=VALUE"),
    "alpha and mbw": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--mbw", "0.5"), r"not both"),
    "one parent": (lambda w: _merge(w, w.p0, "--alpha", "0.3"), r"two|parents"),
    "add_difference two parents": (lambda w: _merge(w, w.p0, w.p1, "--method", "add_difference"), r"3 parents"),
    "missing parent": (lambda w: _merge(w, w.p0, w.path("nope.safetensors"), "--alpha", "0.3"), r"nope.safetensors"),
    "nan parent": (lambda w: _merge(w, w.p0, w.files["nan"], "--alpha", "0.3"), r"NaN or Inf.*input_blocks\.1"),
    "inf parent": (lambda w: _merge(w, w.files["inf"], w.p1, "--alpha", "0.3"), r"NaN or Inf"),
    "integer tensor in B": (lambda w: _merge(w, w.p0, w.files["int"], "--alpha", "0.3"), r"dtype"),
    "integer tensor in A": (lambda w: _merge(w, w.files["int"], w.p1, "--alpha", "0.3"), r"dtype"),
    "shape mismatch": (lambda w: _merge(w, w.p0, w.files["shape"], "--alpha", "0.3"), r"shape"),
    "empty file": (lambda w: _merge(w, w.p0, w.files["empty"], "--alpha", "0.3"), r"empty"),
    "random bytes": (lambda w: _merge(w, w.p0, w.files["random"], "--alpha", "0.3"), r"not a readable safetensors"),
    "truncated file": (lambda w: _merge(w, w.p0, w.files["truncated"], "--alpha", "0.3"), r"truncated"),
    "text as ckpt": (lambda w: _merge(w, w.p0, w.files["text_ckpt"], "--alpha", "0.3"), r"notes.ckpt"),
    "unknown suffix": (lambda w: _merge(w, w.p0, w.files["unknown_suffix"], "--alpha", "0.3"), r"unknown checkpoint format"),
    "pickle with code": (lambda w: _merge(w, w.p0, w.files["payload"], "--alpha", "0.3"), r"refused.*never"),
    "folder that is not diffusers": (lambda w: _merge(w, w.p0, w.files["not_diffusers"], "--alpha", "0.3"), r"just-a-folder"),
    "bad dtype": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--dtype", "fp8"), r"fp8"),
    "bad device": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--device", "tpu"), r"tpu"),
    "bad format": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--format", "ckpt"), r"ckpt"),
    "bare for sd1": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--format", "bare"), r"bare"),
    "missing lora": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--lora", w.path("nolora.safetensors")), r"nolora"),
    "lora that is a checkpoint": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", "--lora", w.files["random"]), r"random.safetensors"),
    "output exists": (lambda w: {"args": ["merge", w.p0, w.p1, "--alpha", "0.3", "-o", w.p1], "untouched": (w.p1,), "watch": (w.root,)},
                      r"exists.*--overwrite"),
    "output is a folder": (lambda w: {"args": ["merge", w.p0, w.p1, "--alpha", "0.3", "-o", w.files["empty_dir"], "--overwrite"],
                                      "watch": (w.root,)}, r"folder"),
    "output under a file": (lambda w: _merge(w, w.p0, w.p1, "--alpha", "0.3", out="p0.safetensors/x.safetensors"), r"not a folder"),
    "diffusers overwrite of a user folder": (
        lambda w: {"args": ["merge", w.p0, w.p1, "--alpha", "0.3", "--format", "diffusers", "--config", w.config, "--overwrite",
                            "-o", w.files["not_diffusers"]], "untouched": (w.files["not_diffusers"],), "watch": (w.root,)},
        r"not a folder evomerge wrote"),
    "diffusers over a file": (
        lambda w: {"args": ["merge", w.p0, w.p1, "--alpha", "0.3", "--format", "diffusers", "--config", w.config, "--overwrite",
                            "-o", w.p1], "untouched": (w.p1,), "watch": (w.root,)}, r"is a file"),
    "inspect missing": (lambda w: {"args": ["inspect", w.path("missing.safetensors")]}, r"no such file"),
    "inspect empty": (lambda w: {"args": ["inspect", w.files["empty"]]}, r"empty"),
    "inspect random": (lambda w: {"args": ["inspect", w.files["random"]]}, r"not a readable"),
    "inspect pickle with code": (lambda w: {"args": ["inspect", w.files["payload"]]}, r"refused"),
    "inspect folder": (lambda w: {"args": ["inspect", w.files["not_diffusers"]]}, r"just-a-folder"),
}


@pytest.mark.parametrize("name", list(MERGE_CASES))
def test_merge_and_inspect_refuse_bad_input_in_one_line(ws: Workspace, name: str) -> None:
    build, match = MERGE_CASES[name]
    case = build(ws)
    line = refuse(case["args"], absent=case.get("absent", ()), untouched=case.get("untouched", ()), watch=case.get("watch", ()),
                  match=match)
    assert "weights_only=False" not in line and "will likely succeed" not in line


@pytest.mark.parametrize("name", ["fifo", "devzero"])
@pytest.mark.parametrize("command", ["inspect", "merge", "study"])
def test_special_files_are_refused_without_reading_them(ws: Workspace, name: str, command: str) -> None:
    """A FIFO would block the reader forever, /dev/zero would be read without end: both are
    refused from their file type (in a subprocess, so a regression fails instead of hanging)."""
    bad = ws.files[name]
    args = {"inspect": ["inspect", bad], "merge": ["merge", ws.p0, bad, "--alpha", "0.3", "-o", ws.path(f"{name}.safetensors")],
            "study": ["study", "run", bad, "--out", ws.path(f"{name}.safetensors")]}[command]
    result = subprocess.run([*evomerge_command(), *map(str, args)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    line = check_refusal(result.returncode, result.stderr, result.stdout)
    assert ("FIFO" in line) if name == "fifo" else ("device" in line), line
    assert not ws.path(f"{name}.safetensors").exists()


def test_a_refused_postgresql_connection_says_so() -> None:
    """Not "Failed to import DB access module": the URL is read with the installed driver, and the
    driver's own reason is the line; the password is not printed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    line = refuse(["worker", "--storage", f"postgresql://me:secret@127.0.0.1:{port}/db", "--study", "x"], match=r"(?i)connection refused")
    assert "import" not in line and "secret" not in line


# ---------------------------------------------------------------------------------------- score
SCORE_CASES: dict[str, tuple[Case, str]] = {
    "text named .png": (lambda w: {"args": ["score", "--images", w.files["fake_png"], "--objective", "fid", "--reference", w.files["fake_png"]]},
                        r"cannot read image .*a.png"),
    "random bytes .png": (lambda w: {"args": ["score", "--images", w.files["random_png"], "--objective", "kid", "--reference",
                                              w.files["random_png"]]}, r"cannot read image"),
    "missing folder": (lambda w: {"args": ["score", "--images", w.path("nowhere"), "--objective", "fid", "--reference", w.files["good_png"]]},
                       r"no image folder"),
    "empty folder": (lambda w: {"args": ["score", "--images", w.files["empty_dir"], "--objective", "fid", "--reference", w.files["good_png"]]},
                     r"holds no images"),
    "fid without reference": (lambda w: {"args": ["score", "--images", w.files["fake_png"], "--objective", "fid"]}, r"--reference"),
    "unknown objective": (lambda w: {"args": ["score", "--images", w.files["fake_png"], "--objective", "sharpness"]}, r"sharpness"),
    "aesthetic without head": (lambda w: {"args": ["score", "--images", w.files["fake_png"], "--objective", "aesthetic"]}, r"head"),
    "aesthetic head is a fifo": (lambda w: {"args": ["score", "--images", w.files["fake_png"], "--objective", "aesthetic",
                                                     "--aesthetic-head", w.files["fifo"]]}, r"FIFO"),
    "aesthetic head with code": (lambda w: {"args": ["score", "--images", w.files["fake_png"], "--objective", "aesthetic",
                                                     "--aesthetic-head", w.files["payload"]]}, r"payload.ckpt"),
}


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_score_refuses_bad_input_in_one_line(ws: Workspace, name: str) -> None:
    build, match = SCORE_CASES[name]
    case = build(ws)
    line = refuse(case["args"], watch=(ws.root,), match=match)
    assert "weights_only=False" not in line


@pytest.mark.skipif(not (SHARED / "imagenet-sample").is_dir(), reason="../shared/assets/imagenet-sample is not available")
def test_fid_and_kid_score_a_folder_of_photos_of_different_sizes(tmp_path: Path) -> None:
    """A user's own photos differ in size (the ImageNet sample: 500x375, 500x333, ...); both the
    generated and the reference side are resized."""
    from PIL import Image

    photos = sorted((SHARED / "imagenet-sample").iterdir())
    sizes = set()
    for name, chosen in (("mine", photos[:12]), ("ref", photos[12:24])):
        folder = tmp_path / name
        folder.mkdir()
        for photo in chosen:
            shutil.copy(photo, folder / photo.name)
            with Image.open(photo) as image:
                sizes.add(image.size)
    assert len(sizes) > 1
    result = runner.invoke(app, ["score", "--images", str(tmp_path / "mine"), "--objective", "fid", "--objective", "kid",
                                 "--reference", str(tmp_path / "ref"), "--json"])
    assert result.exit_code == 0, result.output
    import json

    rows = {r["objective"]: r for r in json.loads(result.stdout)}
    assert rows["fid"]["images"] == 12 and rows["fid"]["value"] > 0 and torch.isfinite(torch.tensor(rows["kid"]["value"]))


# ---------------------------------------------------------------------------------------- studies
needs_zoo = pytest.mark.skipif(not (ZOO / paths.MANIFEST).is_file(), reason="studies/zoo is not built")


def _study_file(folder: Path, **overrides) -> Path:
    """A one-trial zoo study file (tests/test_study.py's, with one global alpha)."""
    from tests.test_study import _study_data

    data = _study_data(folder, **{"name": "faults", "search_space": {"alpha": {"share": "global"}}, "budget": {"trials": 1},
                                  "render": {"batch_size": 3, "grid_images": 2}, **overrides})
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def done_study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished one-trial study, and a study file that differs from it."""
    root = tmp_path_factory.mktemp("study")
    study_file = _study_file(root)
    out = root / "run"
    result = runner.invoke(app, ["study", "run", str(study_file), "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    other = _study_file(root, name="other", sampler={"name": "tpe", "seed": 2})
    return {"root": root, "file": study_file, "out": out, "other": other}


def _study_cases() -> dict[str, tuple[Callable[[dict, Path], dict], str]]:
    def run(file: Path, out: Path) -> list:
        return ["study", "run", file, "--out", out, "--no-progress"]

    def zero_db(s: dict, tmp: Path) -> dict:
        folder = tmp / "zero"
        shutil.copytree(s["out"], folder, ignore=shutil.ignore_patterns("study.db", "report", "artifacts"))
        (folder / "study.db").write_bytes(b"")
        return {"args": ["report", folder], "untouched": (folder / "study.db",), "watch": (folder,)}

    def garbage_db(s: dict, tmp: Path) -> dict:
        folder = tmp / "garbage"
        shutil.copytree(s["out"], folder, ignore=shutil.ignore_patterns("study.db", "report", "artifacts"))
        (folder / "study.db").write_bytes(os.urandom(1000))
        return {"args": ["export", folder, "--format", "mbw", "-o", tmp / "x.txt"], "untouched": (folder / "study.db",),
                "absent": (tmp / "x.txt",), "watch": (folder, tmp)}

    def refused_leaves_nothing(s: dict, tmp: Path) -> dict:
        bad = _study_file(tmp, name="bad", parents=[str(tmp / "missing.safetensors"), str(paths.model_file(ZOO, "colour"))])
        return {"args": run(bad, tmp / "new"), "absent": (tmp / "new",), "watch": (tmp,)}

    def different_study(s: dict, tmp: Path) -> dict:
        return {"args": run(s["other"], s["out"]), "untouched": (s["out"] / "study.yaml", s["out"] / "report"), "watch": (s["out"],)}

    def refused_into_existing(s: dict, tmp: Path) -> dict:
        bad = _study_file(tmp, name="faults", parents=[str(tmp / "missing.safetensors"), str(paths.model_file(ZOO, "colour"))])
        return {"args": run(bad, s["out"]), "untouched": (s["out"] / "study.yaml", s["out"] / "study.db"), "watch": (s["out"],)}

    def out_is_file(s: dict, tmp: Path) -> dict:
        target = tmp / "taken.txt"
        target.write_text("mine\n")
        return {"args": run(s["file"], target), "untouched": (target,), "watch": (tmp,)}

    def out_is_other_folder(s: dict, tmp: Path) -> dict:
        target = tmp / "photos"
        target.mkdir()
        (target / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
        return {"args": run(s["file"], target), "untouched": (target,), "watch": (tmp,)}

    def bad_field(s: dict, tmp: Path) -> dict:
        bad = _study_file(tmp, name="faults", budget={"trials": 0})
        return {"args": run(bad, s["out"]), "untouched": (s["out"] / "study.yaml",), "watch": (s["out"],)}

    def export_exists(s: dict, tmp: Path) -> dict:
        target = tmp / "mine.yaml"
        target.write_text("mine\n")
        return {"args": ["export", s["out"], "--format", "recipe", "-o", target], "untouched": (target,), "watch": (tmp,)}

    def export_bad_trial(s: dict, tmp: Path) -> dict:
        return {"args": ["export", s["out"], "--trial", "99", "-o", tmp / "x.yaml"], "absent": (tmp / "x.yaml",)}

    def export_bad_format(s: dict, tmp: Path) -> dict:
        return {"args": ["export", s["out"], "--format", "ckpt", "-o", tmp / "x.ckpt"], "absent": (tmp / "x.ckpt",)}

    def resume_not_a_study(s: dict, tmp: Path) -> dict:
        return {"args": ["study", "resume", tmp]}

    def report_not_a_study(s: dict, tmp: Path) -> dict:
        return {"args": ["report", tmp], "watch": (tmp,)}

    def worker_missing_db(s: dict, tmp: Path) -> dict:
        return {"args": ["worker", "--storage", f"sqlite:///{tmp / 'nope.db'}", "--study", "faults"], "absent": (tmp / "nope.db",),
                "watch": (tmp,)}

    def worker_missing_study(s: dict, tmp: Path) -> dict:
        db = tmp / "copy.db"
        shutil.copy(s["out"] / "study.db", db)
        return {"args": ["worker", "--storage", f"sqlite:///{db}", "--study", "nobody"], "untouched": (db,), "watch": (tmp,)}

    def dashboard_bad_port(s: dict, tmp: Path) -> dict:
        return {"args": ["dashboard", s["out"], "--port", "99999"], "watch": (s["out"],)}

    def not_yaml(s: dict, tmp: Path) -> dict:
        bad = tmp / "bad.yaml"
        bad.write_text("name: [unclosed\n")
        return {"args": run(bad, tmp / "never"), "absent": (tmp / "never",)}

    return {
        "report on a zero-byte study.db": (zero_db, r"empty"),
        "export from a garbage study.db": (garbage_db, r"not a SQLite database"),
        "refused run leaves nothing": (refused_leaves_nothing, r"missing.safetensors"),
        "different study into a study folder": (different_study, r"different study file"),
        "refused run into an existing study": (refused_into_existing, r"different study file|missing"),
        "--out is a file": (out_is_file, r"is a file"),
        "--out holds other files": (out_is_other_folder, r"other files"),
        "bad field into an existing study": (bad_field, r"budget.trials"),
        "export over an existing file": (export_exists, r"exists"),
        "export of a trial that does not exist": (export_bad_trial, r"99"),
        "export in an unknown format": (export_bad_format, r"ckpt"),
        "resume of a folder that is not a study": (resume_not_a_study, r"not a study folder"),
        "report of a folder that is not a study": (report_not_a_study, r"not a study folder"),
        "dashboard on port 99999": (dashboard_bad_port, r"99999"),
        "worker on a database that does not exist": (worker_missing_db, r"no study database"),
        "worker on a study that does not exist": (worker_missing_study, r"no study named 'nobody'"),
        "study file that is not YAML": (not_yaml, r"YAML"),
    }


STUDY_CASES = _study_cases()


@needs_zoo
@pytest.mark.parametrize("name", list(STUDY_CASES))
def test_study_commands_refuse_bad_input_and_touch_nothing(done_study: dict, tmp_path: Path, name: str) -> None:
    build, match = STUDY_CASES[name]
    case = build(done_study, tmp_path)
    refuse(case["args"], absent=case.get("absent", ()), untouched=case.get("untouched", ()), watch=case.get("watch", ()), match=match)


@needs_zoo
def test_dashboard_on_a_port_in_use_is_refused(done_study: dict) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        refuse(["dashboard", done_study["out"], "--port", str(port)], match=rf"port {port} .*in use")


# --------------------------------------------------------------------- read-only and full disks
def _mount(folder: Path, *options: str) -> None:
    folder.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); read-only and full-disk cases need root")


@pytest.fixture
def mounts(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("read-only and full-disk cases mount a small tmpfs, which needs root")
    ro, full = tmp_path / "ro", tmp_path / "full"
    _mount(ro, "ro", "size=1m")
    _mount(full, "size=96k")
    yield {"ro": ro, "full": full}
    for folder in (ro, full):
        subprocess.run(["umount", "-l", str(folder)], check=False)  # lazy: a storage engine may still hold a deleted file there


def _fill(folder: Path) -> None:
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["ro", "full"])
@pytest.mark.parametrize("what", ["safetensors", "diffusers"])
def test_merge_onto_a_read_only_or_full_disk(ws: Workspace, mounts: dict, where: str, what: str) -> None:
    target = mounts[where] / ("out.safetensors" if what == "safetensors" else "out")
    extra = ["--format", "diffusers", "--config", ws.config] if what == "diffusers" else []
    refuse(["merge", ws.p0, ws.p1, "--alpha", "0.3", *extra, "-o", target], absent=(target,), watch=(mounts[where],),
           match=r"(?i)read-only|No space left")


@needs_zoo
@pytest.mark.parametrize("where", ["ro", "full"])
@pytest.mark.parametrize("fmt", ["recipe", "safetensors"])
def test_export_onto_a_read_only_or_full_disk(done_study: dict, mounts: dict, where: str, fmt: str) -> None:
    if where == "full" and fmt == "recipe":
        _fill(mounts["full"])  # too full for even a small YAML
    target = mounts[where] / f"best.{'yaml' if fmt == 'recipe' else 'safetensors'}"
    refuse(["export", done_study["out"], "--format", fmt, "-o", target], absent=(target,), match=r"(?i)read-only|No space left")
    assert not [p for p in mounts[where].iterdir() if TEMPORARY.search(p.name)]


@needs_zoo
@pytest.mark.parametrize("where", ["ro", "full"])
def test_study_run_onto_a_read_only_or_full_disk(done_study: dict, mounts: dict, where: str) -> None:
    if where == "full":
        _fill(mounts["full"])
    target = mounts[where] / "study"
    refuse(["study", "run", done_study["file"], "--out", target, "--no-progress"], absent=(target,), match=r"(?i)read-only|full|No space left")


# ------------------------------------------------------------------ left behind, moved, shared
@needs_zoo
def test_a_zoo_model_moved_out_of_its_zoo_says_which_config_to_give(tmp_path: Path) -> None:
    moved = [shutil.copy(paths.model_file(ZOO, n), tmp_path / f"{n}.safetensors") for n in ("shape", "colour")]
    target = tmp_path / "merged"
    line = refuse(["merge", *moved, "--alpha", "0.5", "--format", "diffusers", "-o", target], absent=(target,), watch=(tmp_path,))
    assert "zoo model 'shape' outside its zoo folder" in line and "--config" in line
    study = _study_file(tmp_path, parents=[str(p) for p in moved])
    line = refuse(["study", "run", study, "--out", tmp_path / "run", "--no-progress"], absent=(tmp_path / "run",))
    assert "zoo model 'shape' outside its zoo folder" in line
    result = runner.invoke(app, ["merge", *map(str, moved), "--alpha", "0.5", "--format", "diffusers", "--config", str(ZOO / "config"),
                                 "-o", str(target)])
    assert result.exit_code == 0, result.output


def test_stale_temporaries_of_a_killed_write_are_removed_by_the_next_write(ws: Workspace, tmp_path: Path) -> None:
    """kill -9 during a write leaves ``.<name>.evomerge-<host>-<pid>-*.tmp``; the next write of the
    same target removes those whose process is gone, and nothing else (not a live writer's)."""
    from optimizer.atomic import _HOST

    target = tmp_path / "out.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_file = tmp_path / f".out.safetensors.evomerge-{_HOST}-{dead.pid}-abc.tmp"
    stale_file.write_bytes(b"half a checkpoint")
    stale_folder = tmp_path / f".out.safetensors.evomerge-{_HOST}-{dead.pid}-def.tmp"
    stale_folder.mkdir()
    (stale_folder / "unet").mkdir()
    live = tmp_path / f".out.safetensors.evomerge-{_HOST}-{os.getppid()}-ghi.tmp"  # a running process's: kept
    live.write_bytes(b"being written")
    other = tmp_path / ".out.safetensors.someone-else.tmp"  # not our naming: kept
    other.write_bytes(b"theirs")
    result = runner.invoke(app, ["merge", str(ws.p0), str(ws.p1), "--alpha", "0.3", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.is_file() and not stale_file.exists() and not stale_folder.exists()
    assert live.read_bytes() == b"being written" and other.read_bytes() == b"theirs"


def test_outputs_get_the_umask_permissions_not_private_ones(ws: Workspace, tmp_path: Path) -> None:
    import stat

    old = os.umask(0o022)
    try:
        folder = tmp_path / "diffusers"
        result = runner.invoke(app, ["merge", str(ws.p0), str(ws.p1), "--alpha", "0.3", "--format", "diffusers", "--config", str(ws.config),
                                     "-o", str(folder)])
        assert result.exit_code == 0, result.output
        file = tmp_path / "single.safetensors"
        assert runner.invoke(app, ["merge", str(ws.p0), str(ws.p1), "--alpha", "0.3", "-o", str(file)]).exit_code == 0
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*"), file]}
    assert all(mode == (0o755 if p.is_dir() else 0o644) for p, mode in modes.items()), {str(p): oct(m) for p, m in modes.items()}


@needs_zoo
def test_two_study_runs_starting_together_on_a_new_folder_share_one_study(tmp_path: Path) -> None:
    study_file = _study_file(tmp_path, name="together", budget={"trials": 2})
    out = tmp_path / "run"
    cmd = [*evomerge_command(), "study", "run", str(study_file), "--out", str(out), "--no-progress"]
    processes = [subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    for process, (stdout, stderr) in zip(processes, results, strict=True):
        assert process.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "already exists" not in stderr
    import optuna

    study = optuna.load_study(study_name="together", storage=f"sqlite:///{out / 'study.db'}")
    assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 2


@needs_zoo
def test_a_worker_reports_the_storage_it_joined_and_an_export_that_works(done_study: dict, tmp_path: Path) -> None:
    url = f"sqlite:///{done_study['out'] / 'study.db'}"
    worker_folder = tmp_path / "worker"
    result = runner.invoke(app, ["worker", "--storage", url, "--study", "faults", "--out", str(worker_folder)])
    assert result.exit_code == 0, result.output
    assert f"(storage {url})" in result.stdout
    hint = next(line for line in result.stdout.splitlines() if line.startswith("export: "))
    assert str(worker_folder) in hint
    mbw = tmp_path / "best.txt"
    result = runner.invoke(app, ["export", str(worker_folder), "--format", "mbw", "-o", str(mbw)])
    assert result.exit_code == 0 and "alpha" in mbw.read_text(), result.output
