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
