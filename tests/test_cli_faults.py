"""Bad input and faults through the CLI, as a new user would meet them.

Every case is refused the same way: exit code 2, exactly one line on stderr starting with
``error:``, no traceback, nothing at the output path, no temporary left behind, and every file
that was in the way byte for byte as it was. Bad files are generated in a temporary folder.
Read-only and full disks, temporaries and concurrent runs: test_cli_disks.py. Cases that
could hang (a FIFO, ``/dev/zero``) run in a subprocess with a timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from optimizer.cli import app
from optimizer.zoo import paths
from tests.cli_refusal import (
    Workspace,
    check_refusal,
    fault_study_file,
    refuse,
    runner,
)
from tests.study_cli import evomerge_command, subprocess_env
from tests.zoo_study import needs_zoo

pytestmark = pytest.mark.usefixtures("one_thread")
ZOO = paths.default_zoo_dir()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"


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
        bad = fault_study_file(tmp, name="bad", parents=[str(tmp / "missing.safetensors"), str(paths.model_file(ZOO, "colour"))])
        return {"args": run(bad, tmp / "new"), "absent": (tmp / "new",), "watch": (tmp,)}

    def different_study(s: dict, tmp: Path) -> dict:
        return {"args": run(s["other"], s["out"]), "untouched": (s["out"] / "study.yaml", s["out"] / "report"), "watch": (s["out"],)}

    def refused_into_existing(s: dict, tmp: Path) -> dict:
        bad = fault_study_file(tmp, name="faults", parents=[str(tmp / "missing.safetensors"), str(paths.model_file(ZOO, "colour"))])
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
        bad = fault_study_file(tmp, name="faults", budget={"trials": 0})
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


