"""Test-wide settings: offline, and a private evomerge cache per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_evomerge_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep hash caches and materialized config folders out of the user's ~/.cache."""
    os.environ["EVOMERGE_CACHE"] = str(tmp_path_factory.mktemp("evomerge-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are hundreds of small ops: with 2 OpenMP threads on a shared, loaded 2-core CPU
    each op waits on a descheduled thread (14-20x slower seen); 1 thread is as fast when idle.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """``evomerge ... --threads N`` run in-process (CliRunner) sets torch's thread count for the whole
    process: put it back after each test, so one test's setting does not slow every later one."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory):
    """The CLI fault tests' tiny workspace of good and bad files (:func:`tests.cli_refusal.build_workspace`)."""
    from tests.cli_refusal import build_workspace

    return build_workspace(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def done_study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A finished one-trial zoo study, and a study file that differs from it (:func:`tests.cli_refusal.run_done_study`)."""
    from tests.cli_refusal import run_done_study

    return run_done_study(tmp_path_factory.mktemp("study"))
