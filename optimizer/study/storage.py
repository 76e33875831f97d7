"""Where a study lives: its folder, its Optuna storage (with heartbeat), its artifact store.

A study folder (``out/<name>`` by default) holds ``study.yaml`` (the resolved study file),
``study.db`` (the default SQLite storage), ``artifacts/`` (trial image grids), ``report/`` and
``exports/``. Any Optuna RDB URL (PostgreSQL for many machines) can replace the SQLite file;
the resolved study file is also stored in the study itself (user attribute ``evomerge_config``),
so a worker that only knows the storage URL and the study name can join.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import optuna

from optimizer.study.config import HeartbeatConfig, StudyConfig, StudyConfigError, parse_study_config

__all__ = ["CONFIG_ATTR", "StudyFolder", "config_from_study", "open_storage"]

CONFIG_ATTR = "evomerge_config"


class StudyFolder:
    """Paths of one study's folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "study.yaml")
    database = property(lambda self: self.root / "study.db")
    artifacts = property(lambda self: self.root / "artifacts")
    report = property(lambda self: self.root / "report")
    exports = property(lambda self: self.root / "exports")

    def storage_url(self, config: StudyConfig) -> str:
        return config.storage or f"sqlite:///{self.database.resolve()}"

    def write_config(self, config: StudyConfig) -> Path:
        """Write the resolved study file atomically (absolute paths, every default spelled out)."""
        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        fd, tmp = tempfile.mkstemp(prefix=".study.yaml.", dir=self.root)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, self.config)
        return self.config


def open_storage(url: str, *, heartbeat: HeartbeatConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeat: a trial whose process died is failed after ``grace``
    seconds and re-enqueued (up to ``max_retry`` times) by ``RetryHeartbeatStaleTrialCallback``
    (see :mod:`optimizer.study.liveness` for trials that died before their first beat)."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # heartbeat is "experimental" in Optuna since 2.9; we rely on it knowingly
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat.interval,
                grace_period=heartbeat.grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=heartbeat.max_retry),
            )
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds
        raise StudyConfigError(f"storage {url!r} cannot be opened: {exc}") from None


def config_from_study(study: optuna.Study) -> StudyConfig:
    """The study file stored in the study by the run that created it."""
    raw = study.user_attrs.get(CONFIG_ATTR)
    if raw is None:
        raise StudyConfigError(f"study {study.study_name!r} was not created by evomerge (no {CONFIG_ATTR} attribute)")
    return parse_study_config(json.loads(raw), source=f"study {study.study_name!r}")
