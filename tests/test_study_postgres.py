"""Two processes, one study, a PostgreSQL storage: `evomerge study run` and `evomerge worker`.

The database is a throwaway cluster started by :mod:`tests.postgres` (skipped without PostgreSQL
server binaries; ``.ci/run`` installs them).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from optimizer.zoo import paths
from tests import postgres
from tests.postgres import PostgresServer
from tests.study_cli import PROMPTS, evomerge_command, subprocess_env
from tests.zoo_clip import ZOO_CLIP

postgres_server = postgres.postgres_server  # the module-scoped fixture: a throwaway cluster (skips without one)

BUDGET = 8
WORKERS = 2
STUDY = "pg-two-workers"
RUN_APP, WORKER_APP = "evomerge-run", "evomerge-worker"  # libpq application_name of each process

pytestmark = pytest.mark.skipif(
    not (paths.default_zoo_dir() / paths.MANIFEST).is_file(), reason="studies/zoo is not built (evomerge zoo build)"
)

def _with_app(url: str, name: str) -> str:
    return f"{url}&application_name={name}"


def _tail(process: subprocess.Popen[str] | None, label: str) -> str:
    if process is None:
        return f"--- {label}: not started"
    _stop(process)  # only failure paths ask: collect what it wrote so far
    try:
        out, err = process.communicate(timeout=30)
    except (subprocess.TimeoutExpired, ValueError):
        out, err = "", "(still running)"
    return f"--- {label} (rc {process.returncode}) stdout:\n{(out or '')[-2000:]}\n--- {label} stderr:\n{(err or '')[-4000:]}"


def _stop(process: subprocess.Popen[str] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def _waiting_on_locks(conn) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT application_name FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        return {row[0] for row in cur.fetchall()}


def test_study_run_and_a_worker_share_one_postgres_study(tmp_path: Path, postgres_server: PostgresServer) -> None:
    """`study run` and `worker` run one PostgreSQL study together; nothing is lost or run twice.

    A barrier makes "both processes ran trials" deterministic: before anything starts, the test
    creates Optuna's schema and holds ``LOCK TABLE trials IN ACCESS EXCLUSIVE MODE``. Each process
    creates/loads the study and builds its runner (parents, pipeline, CLIP), then blocks on its
    first read of ``trials``. Once ``pg_stat_activity`` shows both processes (told apart by their
    libpq ``application_name``) waiting on a lock, the lock is released, so both start trials
    together (one torch thread each) instead of one finishing the whole budget while the other is
    still importing torch.

    Which process ran a trial: each process uploads its trials' image grids into the artifact store
    of its own ``--out`` folder, and the trial's ``grid_artifact`` user attribute names the file. So
    every trial's artifact must be in exactly one of the two folders, both folders must hold some,
    and together exactly one per trial (no trial's grid uploaded twice).

    Counts: a process starts a trial only while finished + live RUNNING trials (of both processes)
    are fewer than the budget (``optimizer.study.liveness``), so the study ends with BUDGET trials;
    only two decisions in the same instant can both start one, hence BUDGET to BUDGET + 1 trials, all
    COMPLETE (pruner none, nothing fails), numbered 0..n-1 without gaps or repeats, and the one
    warm-start trial (enqueued once by `study run`) is taken by exactly one process. (The exact count
    under a held-open trial is tested deterministically in ``test_study_liveness``.)
    """
    import optuna
    import psycopg2

    from optimizer.study.storage import CONFIG_ATTR

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = postgres_server.url
    (tmp_path / "prompts.yaml").write_text(yaml.safe_dump(PROMPTS))
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": STUDY,
        "parents": [str(paths.default_zoo_dir() / "models" / f"{m}.safetensors") for m in ("shape", "colour")],
        "search_space": {"alpha": {"share": "global"}},
        "warm_start": [{"uniform": 0.5}],
        "objectives": ["clip"],
        "scorers": dict(ZOO_CLIP),
        "prompts": "prompts.yaml",
        "render": {"batch_size": 6, "grid_images": 4},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
        "budget": {"trials": BUDGET},
        "storage": _with_app(url, RUN_APP),
    }, sort_keys=False))
    run_out, worker_out = tmp_path / "run", tmp_path / "worker"

    # Optuna's tables now, so the barrier lock can be taken before either process starts.
    schema = optuna.storages.RDBStorage(url)
    schema.engine.dispose()
    connect = dict(dbname=postgres_server.database, user="evomerge", host=str(postgres_server.socket_dir), port=postgres_server.port)
    barrier = psycopg2.connect(**connect)
    watch = psycopg2.connect(**connect)
    watch.autocommit = True
    with barrier.cursor() as cur:
        cur.execute("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE")
    # The test's own polling must never wait on its own lock: fail fast instead.
    poll_storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"options": "-c lock_timeout=5000"}})

    env = subprocess_env()
    run = worker = None
    started = time.monotonic()
    try:
        run = subprocess.Popen([*evomerge_command(), "study", "run", str(study_file), "--out", str(run_out), "--no-progress"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:  # the study exists, with its study file stored (the worker reads it from there)
            assert run.poll() is None, f"`study run` exited early\n{_tail(run, 'study run')}"
            assert time.monotonic() < deadline, f"the study never appeared in {url}\n{_tail(run, 'study run')}"
            try:
                if CONFIG_ATTR in optuna.load_study(study_name=STUDY, storage=poll_storage).user_attrs:
                    break
            except KeyError:
                pass
            time.sleep(0.25)
        worker = subprocess.Popen(
            [*evomerge_command(), "worker", "--storage", _with_app(url, WORKER_APP), "--study", STUDY, "--out", str(worker_out)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 300
        while not {RUN_APP, WORKER_APP} <= (waiting := _waiting_on_locks(watch)):
            for process, label in ((run, "study run"), (worker, "worker")):
                assert process.poll() is None, f"{label} exited before the barrier\n{_tail(run, 'study run')}\n{_tail(worker, 'worker')}"
            assert time.monotonic() < deadline, (f"barrier never reached (waiting on locks: {waiting})\n"
                                                 f"{_tail(run, 'study run')}\n{_tail(worker, 'worker')}")
            time.sleep(0.2)
        barrier.rollback()  # release: both processes start trials now
        barrier_s = time.monotonic() - started
        try:
            run_out_text, run_err = run.communicate(timeout=600)
            worker_out_text, worker_err = worker.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the study did not finish in 600 s\n{_tail(run, 'study run')}\n{_tail(worker, 'worker')}") from None
    except BaseException:
        barrier.rollback()
        _stop(run)
        _stop(worker)
        raise
    finally:
        barrier.close()
        watch.close()
    total_s = time.monotonic() - started
    logs = (f"--- study run stdout:\n{run_out_text[-2000:]}\n--- study run stderr:\n{run_err[-4000:]}\n"
            f"--- worker stdout:\n{worker_out_text[-2000:]}\n--- worker stderr:\n{worker_err[-4000:]}")
    assert run.returncode == 0 and worker.returncode == 0, logs

    study = optuna.load_study(study_name=STUDY, storage=poll_storage)
    trials = study.get_trials(deepcopy=False)
    numbers = sorted(t.number for t in trials)
    states = {t.number: t.state.name for t in trials}
    assert numbers == list(range(len(trials))), f"trial numbers with gaps or repeats: {numbers}"
    assert all(s == "COMPLETE" for s in states.values()), f"not all COMPLETE: {states}\n{logs}"
    assert BUDGET <= len(trials) <= BUDGET + WORKERS - 1, f"{len(trials)} trials for a budget of {BUDGET}\n{logs}"
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert pids == {run.pid, worker.pid}, f"trials were not run by both processes: {pids}"
    warm = [t.number for t in trials if "fixed_params" in t.system_attrs]
    assert len(warm) == 1, f"the warm-start trial ran {len(warm)} times: {warm}"
    assert next(t for t in trials if t.number == warm[0]).params["alpha"] == pytest.approx(0.5)

    by_process: dict[str, set[int]] = {"study run": set(), "worker": set()}
    run_files = {p.name for p in (run_out / "artifacts").iterdir()}
    worker_files = {p.name for p in (worker_out / "artifacts").iterdir()}
    for t in trials:
        artifact = t.user_attrs.get("grid_artifact")
        assert artifact, f"trial {t.number} has no grid artifact"
        where = [name for name, files in (("study run", run_files), ("worker", worker_files)) if artifact in files]
        assert len(where) == 1, f"trial {t.number}: artifact {artifact} found in {where or 'neither folder'}"
        by_process[where[0]].add(t.number)
    assert len(run_files) + len(worker_files) == len(trials), (len(run_files), len(worker_files), len(trials))
    assert by_process["study run"] and by_process["worker"], f"one process ran every trial: {by_process}\n{logs}"

    # Both processes end with the summary of the shared study (the first to stop may still see the
    # other's in-flight trial: "study NAME: 1 running, 8 complete").
    for label, text in (("study run", run_out_text), ("worker", worker_out_text)):
        assert re.search(rf"study {STUDY}: (\d+ \w+, )*\d+ complete", text), f"{label} printed no summary:\n{text}"
    print(f"\n{len(trials)} trials (budget {BUDGET}): study run ran {sorted(by_process['study run'])}, "
          f"worker ran {sorted(by_process['worker'])}; barrier after {barrier_s:.1f} s, done after {total_s:.1f} s")
    poll_storage.engine.dispose()
