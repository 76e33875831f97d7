"""`evomerge dashboard`: optuna-dashboard serves a finished study and its trials' image grids.

A 2-trial zoo study (6 search prompts, 32x32, 6 steps) is run with `evomerge study run`, then
`evomerge dashboard DIR --port P` is started (module fixture, always stopped afterwards):

* HTTP: the API lists the study; each trial's grid comes back from the dashboard's artifact route
  ``/artifacts/<study_id>/<trial_id>/<artifact_id>`` byte for byte as stored under DIR/artifacts;
* headless Chromium (skipped without ``chromium``/``chromium-browser``): the trial-list page
  ``/dashboard/studies/<study_id>/trials?numbers=0,1`` (the SPA route; ``numbers`` selects trials)
  renders the study name, both trials and an ``<img src="/artifacts/...">`` per trial grid; a
  screenshot of one trial's page is not blank and shows that trial's grid.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from optimizer.zoo import paths
from tests.study_cli import PROMPTS, evomerge_command, subprocess_env
from tests.zoo_clip import ZOO_CLIP

STUDY = "dash-zoo"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(
    not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built (evomerge zoo build)"
)

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # its own session (start_new_session): only what we started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@dataclass(frozen=True)
class Trial:
    number: int
    trial_id: int
    artifact_id: str


@dataclass(frozen=True)
class Dashboard:
    base: str
    folder: Path
    study_id: int
    trials: list[Trial]

    def artifact_url(self, trial: Trial) -> str:
        return f"/artifacts/{self.study_id}/{trial.trial_id}/{trial.artifact_id}"


def _start_dashboard(folder: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `evomerge dashboard` on a free port and wait until it answers (retries a lost port race)."""
    last = ""
    for _ in range(3):
        port = _free_port()
        with log.open("wb") as sink:
            process = subprocess.Popen([*evomerge_command(), "dashboard", str(folder), "--port", str(port)], cwd=folder.parent,
                                       env=subprocess_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        try:
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    status, _, body = _get(f"{base}/api/meta", timeout=5)
                except OSError:
                    time.sleep(0.25)
                    continue
                if status == 200:
                    assert json.loads(body)["artifact_is_available"], "the dashboard has no artifact store"
                    return process, base
                time.sleep(0.25)
        except BaseException:
            _stop(process)
            raise
        _stop(process)
        last = log.read_text(errors="replace")[-3000:]
        if "Address already in use" not in last:
            break
    raise AssertionError(f"`evomerge dashboard` never answered on /api/meta:\n{last}")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    root = tmp_path_factory.mktemp("dashboard")
    (root / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS))
    study_file = root / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": STUDY,
        "parents": [str(paths.default_zoo_dir() / "models" / f"{m}.safetensors") for m in ("shape", "colour")],
        "search_space": {"alpha": {"share": "global"}},
        "objectives": ["clip"],
        "scorers": dict(ZOO_CLIP),
        "prompts": "prompts.yaml",
        "render": {"batch_size": 6, "grid_images": 6},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"trials": 2},
    }, sort_keys=False))
    folder = root / "study"
    done = subprocess.run([*evomerge_command(), "study", "run", str(study_file), "--out", str(folder), "--no-progress"],
                          cwd=root, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"

    process, base = _start_dashboard(folder, root / "dashboard.log")
    try:
        status, _, body = _get(f"{base}/api/studies")
        assert status == 200, body[:500]
        studies = {s["study_name"]: s["study_id"] for s in json.loads(body)["study_summaries"]}
        assert STUDY in studies, studies
        study_id = studies[STUDY]
        status, _, body = _get(f"{base}/api/studies/{study_id}")
        assert status == 200, body[:500]
        trials = []
        for t in json.loads(body)["trials"]:
            assert t["state"] == "Complete", t["state"]
            user_attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
            images = [a for a in t["artifacts"] if a["mimetype"] == "image/png"]
            assert [a["artifact_id"] for a in images] == [user_attrs["grid_artifact"]], (images, user_attrs.get("grid_artifact"))
            trials.append(Trial(number=t["number"], trial_id=t["trial_id"], artifact_id=images[0]["artifact_id"]))
        assert sorted(t.number for t in trials) == [0, 1]
        yield Dashboard(base=base, folder=folder, study_id=study_id, trials=sorted(trials, key=lambda t: t.number))
    finally:
        _stop(process)


def test_dashboard_lists_the_study_and_serves_each_trial_grid(dashboard: Dashboard) -> None:
    for trial in dashboard.trials:
        status, content_type, body = _get(dashboard.base + dashboard.artifact_url(trial))
        assert status == 200, body[:300]
        assert content_type == "image/png"
        assert body.startswith(PNG_SIGNATURE)
        assert body == (dashboard.folder / "artifacts" / trial.artifact_id).read_bytes()
        with Image.open(dashboard.folder / "artifacts" / trial.artifact_id) as grid:
            assert grid.width >= 32 and grid.height >= 32
    # an artifact of another trial is not served under this trial's id
    first, second = dashboard.trials
    status, _, _ = _get(f"{dashboard.base}/artifacts/{dashboard.study_id}/{first.trial_id}/{second.artifact_id}")
    assert status == 404


# ---------------------------------------------------------------------------------- Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


needs_chromium = pytest.mark.skipif(
    _chromium() is None, reason="no chromium or chromium-browser on PATH (apt-get install chromium; .ci/run does)"
)


def _headless(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    browser = _chromium()
    assert browser is not None
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=15000", *extra, url]
    # its own session, so a hung browser is killed with its renderer/zygote children
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate(timeout=30)
        raise AssertionError(f"chromium did not finish in 180 s: {url}\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)


@needs_chromium
def test_chromium_renders_the_trial_list_with_each_trial_grid(dashboard: Dashboard, tmp_path: Path) -> None:
    url = f"{dashboard.base}/dashboard/studies/{dashboard.study_id}/trials?numbers=0,1"
    wanted = [STUDY, "Trial 0", "Trial 1"] + [f'src="{dashboard.artifact_url(t)}"' for t in dashboard.trials]
    dom = ""
    for _ in range(3):  # a loaded machine may dump the DOM before the SPA has fetched the study
        done = _headless(url, tmp_path, "--dump-dom")
        assert done.returncode == 0, done.stderr[-3000:]
        dom = html.unescape(done.stdout)
        if all(w in dom for w in wanted):
            break
    missing = [w for w in wanted if w not in dom]
    assert not missing, f"{missing} not in the rendered DOM of {url}:\n{dom[-3000:]}"
    images = [line for line in dom.split("<img")[1:] if "/artifacts/" in line.split(">")[0]]
    assert len(images) == len(dashboard.trials), images


def _ncc_max(image: np.ndarray, template: np.ndarray) -> float:
    """Best normalized cross-correlation of ``template`` over ``image`` (2-D float arrays, FFT)."""
    h, w = template.shape
    big_h, big_w = image.shape
    if h > big_h or w > big_w:
        return 0.0
    t = template - template.mean()
    t_norm = float(np.sqrt((t * t).sum()))
    if t_norm == 0:
        return 0.0
    shape = (big_h + h - 1, big_w + w - 1)
    corr = np.fft.irfft2(np.fft.rfft2(image, shape) * np.fft.rfft2(t[::-1, ::-1], shape), shape)[h - 1:big_h, w - 1:big_w]

    def window_sum(a: np.ndarray) -> np.ndarray:
        c = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]

    s1, s2 = window_sum(image), window_sum(image * image)
    var = np.maximum(s2 - s1 * s1 / (h * w), 0.0)
    ncc = np.where(var > 1e-3 * h * w, corr / (np.sqrt(var) * t_norm + 1e-9), 0.0)
    return float(ncc.max())


def _find_scaled(screen: Image.Image, grid: Image.Image) -> tuple[float, float]:
    """``(best NCC, scale)`` of ``grid`` drawn anywhere in ``screen`` at any scale 0.75-4 (coarse to fine)."""
    gray = np.asarray(screen.convert("L"), dtype=np.float64)
    small = gray[::2, ::2]

    def score(scale: float, image: np.ndarray, factor: float) -> float:
        size = (max(4, round(grid.width * scale / factor)), max(4, round(grid.height * scale / factor)))
        template = np.asarray(grid.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
        return _ncc_max(image, template)

    coarse = max((score(s, small, 2.0), s) for s in np.arange(0.75, 4.0, 0.1))
    return max((score(s, gray, 1.0), s) for s in np.arange(coarse[1] - 0.1, coarse[1] + 0.1, 0.02))


@needs_chromium
def test_chromium_screenshot_of_a_trial_shows_its_grid(dashboard: Dashboard, tmp_path: Path) -> None:
    trial = dashboard.trials[1]
    url = f"{dashboard.base}/dashboard/studies/{dashboard.study_id}/trials?numbers={trial.number}"
    shot = tmp_path / "trial.png"
    done = _headless(url, tmp_path, f"--screenshot={shot}", "--window-size=1400,1000")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-3000:]
    with Image.open(shot) as image:
        screen = image.convert("RGB")
    assert screen.size == (1400, 1000)
    pixels = np.asarray(screen)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 200 and float(pixels.std()) > 20, f"a blank page? {colours} colours, std {pixels.std():.1f}"
    with Image.open(dashboard.folder / "artifacts" / trial.artifact_id) as grid:
        best, scale = _find_scaled(screen, grid.convert("RGB"))
    # the right grid matches at ~0.99; the page with that card blanked out scores ~0.55
    assert best > 0.9, f"trial {trial.number}'s grid not found in the screenshot (best match {best:.3f} at scale {scale:.2f})"
