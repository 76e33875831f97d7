"""Dead and live trials, and a trial budget shared by several processes (optimizer.study.liveness).

The processes here are threads running ``run_study`` with their own storage connection and a
scripted objective in place of the renderer, so which trial is live and when it ends is decided
by the test, not by timing."""

from __future__ import annotations

import re
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from optimizer.render.renderer import NonFiniteImages
from optimizer.study.config import HeartbeatConfig, StudyConfigError, parse_study_config
from optimizer.study.liveness import running_trials, settle_trials
from optimizer.study.loop import StudyFailed, run_study
from optimizer.study.storage import StudyFolder, open_storage
from tests.zoo_study import needs_zoo, zoo_study_data

pytestmark = [pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")]

BEAT = HeartbeatConfig(interval=1, grace=3, max_retry=2)


def _storage(tmp_path: Path) -> optuna.storages.RDBStorage:
    return open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat=BEAT)


def _wait_for(condition, *, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_trial_that_died_before_its_first_beat_is_failed_and_retried(tmp_path: Path) -> None:
    """Optuna's own stale check skips a RUNNING trial that never beat; ours fails and retries it."""
    storage = _storage(tmp_path)
    study = optuna.create_study(study_name="s", storage=storage)
    silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # killed before any beat
    beating = study.ask()
    storage.record_heartbeat(beating._trial_id)
    done = study.ask()
    study.tell(done, 1.0)

    assert [t.number for t in running_trials(storage, study_name="s")] == [silent.number, beating.number]
    usage = settle_trials(study, storage=storage, grace=BEAT.grace)
    assert usage.failed == ()  # both still within grace
    assert (usage.finished, usage.live, usage.used) == (1, 2, 3)

    time.sleep(BEAT.grace + 1.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(study)  # Optuna's check: only the trial that beat
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[beating.number] == "FAIL" and states[silent.number] == "RUNNING"

    assert settle_trials(study, storage=storage, grace=BEAT.grace).failed == (silent.number,)
    assert settle_trials(study, storage=storage, grace=BEAT.grace).failed == ()  # once only
    trials = study.get_trials()
    assert {t.number: t.state.name for t in trials}[silent.number] == "FAIL"
    retries = [t for t in trials if t.state.name == "WAITING"]
    by_origin = {t.system_attrs["failed_trial"]: t for t in retries}
    assert set(by_origin) == {silent.number, beating.number}  # each retried exactly once
    assert by_origin[silent.number].params == silent.params
    assert settle_trials(study, storage=storage, grace=BEAT.grace).used == 1


@pytest.mark.parametrize("heartbeat, message", [
    ({"interval": 5, "grace": 5}, "heartbeat: grace (5 s) must be longer than interval (5 s)"),
    ({"interval": 0}, "heartbeat.interval: Input should be greater than or equal to 1"),
])
def test_bad_heartbeats_name_the_field(tmp_path: Path, heartbeat: dict, message: str) -> None:
    with pytest.raises(StudyConfigError, match=re.escape(message)):
        parse_study_config(zoo_study_data(tmp_path, heartbeat=heartbeat), source="t", base=tmp_path)


class _ScriptedRunner:
    """A stand-in for StudyRunner: each call waits for the test's go-ahead and returns or raises."""

    space = SimpleNamespace(layout=SimpleNamespace(name="sd1"))

    def __init__(self, *, hold_first: threading.Event | None = None, fail_first: bool = False) -> None:
        self.hold_first, self.fail_first = hold_first, fail_first
        self.started = threading.Event()
        self.calls = 0

    def __call__(self, trial: optuna.Trial) -> float:
        self.calls += 1
        first = self.calls == 1
        trial.suggest_float("alpha", 0.0, 1.0)
        if first and self.hold_first is not None:
            self.started.set()
            assert self.hold_first.wait(120), "the test never released the held trial"
            if self.fail_first:
                raise NonFiniteImages("scripted failure")  # an expected failure: fails the trial, not the study
        return 0.5


def _config(tmp_path: Path, *, trials: int):
    data = zoo_study_data(tmp_path, name="shared", budget={"trials": trials},
                       heartbeat={"interval": BEAT.interval, "grace": BEAT.grace, "max_retry": BEAT.max_retry},
                       storage=f"sqlite:///{tmp_path / 'shared.db'}")
    return parse_study_config(data, source="test", base=tmp_path)


def _in_thread(errors: list[BaseException], **kwargs) -> threading.Thread:
    def target() -> None:
        try:
            run_study(progress=False, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


@needs_zoo
@pytest.mark.parametrize("slow_trial_fails", [False, True])
def test_a_shared_trial_budget_counts_the_live_trials_of_other_processes(tmp_path: Path, slow_trial_fails: bool) -> None:
    """Budget 3; process A holds one trial open while process B runs.

    B completes 2 trials, then finished (2) + live (A's 1) = 3: B starts no third trial and waits
    (``MaxTrialsCallback`` would have let B run a third, and A's trial made 4). When A's trial
    completes, both stop with exactly 3 trials. When A's trial fails instead (and A gives up after
    one failure), the budget is open again and the waiting B runs the replacement: 3 COMPLETE."""
    config = _config(tmp_path, trials=3)
    release = threading.Event()
    slow = _ScriptedRunner(hold_first=release, fail_first=slow_trial_fails)
    fast = _ScriptedRunner()
    errors_a: list[BaseException] = []
    errors_b: list[BaseException] = []
    a = _in_thread(errors_a, config=config, folder=StudyFolder(tmp_path / "a"), runner=slow, max_consecutive_failures=1)
    assert slow.started.wait(60), "process A never started its trial"
    b = _in_thread(errors_b, config=config, folder=StudyFolder(tmp_path / "b"), runner=fast, salt=7)
    poll = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'shared.db'}")

    def states() -> list[str]:
        return [t.state.name for t in poll.get_trials(deepcopy=False)]

    _wait_for(lambda: states().count("COMPLETE") == 2, what="B's two trials")
    time.sleep(2 * BEAT.interval + 0.5)  # B's waiting loop polls every interval: give it the chance to go wrong
    assert b.is_alive(), "B exited while A's trial was still running"
    assert fast.calls == 2 and sorted(states()) == ["COMPLETE", "COMPLETE", "RUNNING"]

    release.set()
    a.join(120)
    b.join(120)
    assert not a.is_alive() and not b.is_alive()
    assert not errors_b, errors_b
    final = states()
    if slow_trial_fails:
        assert len(errors_a) == 1 and isinstance(errors_a[0], StudyFailed)
        assert fast.calls == 3 and sorted(final) == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]
    else:
        assert not errors_a, errors_a
        assert fast.calls == 2 and final == ["COMPLETE", "COMPLETE", "COMPLETE"]
