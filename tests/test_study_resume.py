"""A study survives its process: resume after kill -9, Ctrl-C, an older stored study file, and
resumed or joining processes that do not replay the first random sequence."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from optimizer.study.config import parse_study_config
from tests.zoo_study import needs_zoo, write_zoo_study, zoo_study_data

REPO = Path(__file__).resolve().parents[1]


def test_a_study_stored_by_an_earlier_version_still_resumes(tmp_path: Path) -> None:
    """Fields added to the study file since a study was created take their defaults when the
    stored file is compared: the study is not "a different study file"."""
    import json

    from optimizer.study.loop import create_or_load_study
    from optimizer.study.storage import CONFIG_ATTR, open_storage

    config = parse_study_config(zoo_study_data(tmp_path), source="test", base=tmp_path)
    storage = open_storage(f"sqlite:///{tmp_path / 'old.db'}", heartbeat=config.heartbeat)
    study, new = create_or_load_study(config, storage=storage)
    older = config.model_dump(mode="json")
    del older["allow_nonfinite"]  # what a study made before the field existed stored
    study.set_user_attr(CONFIG_ATTR, json.dumps(older, sort_keys=True))
    again, new = create_or_load_study(config, storage=storage)
    assert not new and again.study_name == config.name


def _states(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()


@needs_zoo
def test_resume_after_kill_9_loses_no_completed_trial_and_retries_the_killed_one(tmp_path: Path) -> None:
    study_file = write_zoo_study(tmp_path, name="killed", budget={"trials": 6}, heartbeat={"interval": 1, "grace": 3, "max_retry": 2})
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "optimizer.cli", "study", "run", str(study_file), "--out", str(out), "--no-progress"]
    db = out / "study.db"
    process = _run_until_a_trial_runs(cmd, db=db, env=env)
    try:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    before = _states(db)
    complete_before = {n for n, s in before if s == "COMPLETE"}
    killed = [n for n, s in before if s == "RUNNING"]
    assert killed
    time.sleep(3.5)  # past the heartbeat grace period
    result = subprocess.run([sys.executable, "-m", "optimizer.cli", "study", "resume", str(out), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{db}")
    by_number = {t.number: t for t in study.trials}
    assert all(by_number[n].state.name == "COMPLETE" for n in complete_before)  # nothing lost
    assert by_number[killed[0]].state.name == "FAIL"
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0]]
    assert retried and retried[0].state.name == "COMPLETE"
    # the parameters the killed trial had drawn are replayed (none if it died before sampling)
    assert {k: retried[0].params[k] for k in by_number[killed[0]].params} == by_number[killed[0]].params
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 6
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    from optimizer.study.report import trials_table

    note = trials_table(study).set_index("trial").loc[killed[0], "note"]
    assert "process stopped" in note and f"retried as trial {retried[0].number}" in note


def _run_until_a_trial_runs(cmd: list[str], *, db: Path, env: dict, complete: int = 2) -> subprocess.Popen:
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the study ended before it could be stopped: {process.stderr.read()[-2000:]}")
        if db.is_file():
            try:
                states = _states(db)
            except sqlite3.OperationalError:
                states = []
            if sum(s == "COMPLETE" for _, s in states) >= complete and any(s == "RUNNING" for _, s in states):
                return process
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail("no running trial after two complete ones")


@needs_zoo
def test_ctrl_c_stops_cleanly_fails_and_requeues_the_running_trial_and_writes_the_report(tmp_path: Path) -> None:
    study_file = write_zoo_study(tmp_path, name="interrupted", budget={"trials": 5})
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "optimizer.cli", "study", "run", str(study_file), "--out", str(out), "--no-progress"]
    process = _run_until_a_trial_runs(cmd, db=out / "study.db", env=env)
    try:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("note: ")]  # set-up notes aside
    assert len(lines) == 1 and "interrupted: trial" in lines[0] and "study resume" in lines[0], lines
    study = optuna.load_study(study_name="interrupted", storage=f"sqlite:///{out / 'study.db'}")
    stopped = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(stopped) == 1 and "interrupted" in stopped[0].user_attrs["failure"]
    queued = [t for t in study.trials if t.system_attrs.get("failed_trial") == stopped[0].number]
    assert len(queued) == 1 and queued[0].state.name == "WAITING" and queued[0].params == stopped[0].params
    report = (out / "report" / "trials.md").read_text()
    assert "interrupted" in report and "study interrupted" in stdout
    result = subprocess.run([sys.executable, "-m", "optimizer.cli", "study", "resume", str(out), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="interrupted", storage=f"sqlite:///{out / 'study.db'}")
    retried = next(t for t in study.trials if t.number == queued[0].number)
    assert retried.state.name == "COMPLETE" and retried.params == stopped[0].params
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 5


def test_resumed_and_joining_processes_do_not_replay_the_first_random_sequence() -> None:
    from optimizer.study.config import SamplerConfig
    from optimizer.study.samplers import make_sampler, process_seed

    config = SamplerConfig(name="random", seed=0)
    assert process_seed(config, trials_so_far=0) == 0
    seeds = {process_seed(config, trials_so_far=0, salt=1), process_seed(config, trials_so_far=5), process_seed(config, trials_so_far=5, salt=9)}
    assert len(seeds) == 3 and 0 not in seeds
    assert process_seed(SamplerConfig(name="random", seed=None), trials_so_far=5) is None

    def first_values(seed):
        study = optuna.create_study(sampler=make_sampler(config, seed=seed))
        return [study.ask().suggest_float("x", 0, 1) for _ in range(3)]

    assert first_values(0) == first_values(0)
    assert first_values(process_seed(config, trials_so_far=0, salt=1)) != first_values(0)
