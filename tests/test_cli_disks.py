"""The CLI on hostile file systems: read-only and full disks (small tmpfs mounts, root only; skipped
otherwise), temporaries left by a killed write, the umask, zoo models moved out of their zoo, two
runs starting together on one folder, and a worker's export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.cli import app
from optimizer.zoo import paths
from tests.cli_refusal import TEMPORARY, Workspace, fault_study_file, refuse, runner
from tests.study_cli import evomerge_command, subprocess_env
from tests.zoo_study import needs_zoo

pytestmark = pytest.mark.usefixtures("one_thread")
ZOO = paths.default_zoo_dir()


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
    study = fault_study_file(tmp_path, parents=[str(p) for p in moved])
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
    study_file = fault_study_file(tmp_path, name="together", budget={"trials": 2})
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
