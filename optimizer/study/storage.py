"""Where a study lives: its folder, its Optuna storage (with heartbeat), its artifact store.

A study folder (``out/<name>`` by default) holds ``study.yaml`` (the resolved study file),
``study.db`` (the default SQLite storage), ``artifacts/`` (trial image grids), ``report/`` and
``exports/``. Any Optuna RDB URL (PostgreSQL for many machines) can replace the SQLite file;
the resolved study file is also stored in the study itself (user attribute ``evomerge_config``),
so a worker that only knows the storage URL and the study name can join.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna

from optimizer.study.config import HeartbeatConfig, StudyConfig, StudyConfigError, parse_study_config

__all__ = ["CONFIG_ATTR", "StudyFolder", "config_from_study", "open_storage"]

CONFIG_ATTR = "evomerge_config"


class StudyFolder:
    """Paths of one study's folder, and the checks that keep a folder to one study."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "study.yaml")
    database = property(lambda self: self.root / "study.db")
    artifacts = property(lambda self: self.root / "artifacts")
    report = property(lambda self: self.root / "report")
    exports = property(lambda self: self.root / "exports")

    def storage_url(self, config: StudyConfig) -> str:
        return config.storage or f"sqlite:///{self.database.resolve()}"

    def check_for(self, config: StudyConfig) -> None:
        """Refuse, before anything is created or loaded, a folder that cannot hold ``config``'s
        study: a file, a folder of other files, a folder holding a different study (its study.yaml
        differs in anything but ``storage``), or one that cannot be written."""
        from optimizer.atomic import check_output

        root = self.root
        if root.exists() and not root.is_dir():
            raise StudyConfigError(f"{root}: is a file, not a study folder; give another --out")
        if root.is_dir():
            if self.config.is_file():
                from optimizer.study.config import load_study_config

                try:
                    stored = load_study_config(self.config)
                except StudyConfigError as exc:
                    raise StudyConfigError(f"{root} holds a study.yaml that cannot be read ({exc}); give another --out") from None
                if _comparable(stored) != _comparable(config):
                    raise StudyConfigError(
                        f"{root} holds study {stored.name!r} with a different study file; give another --out, "
                        f"or continue it with `evomerge study resume {root}`"
                    )
            elif any(p.name not in _OURS for p in root.iterdir()):
                raise StudyConfigError(f"{root}: holds other files and no study.yaml; give a new or empty folder as --out")
            if not os.access(root, os.W_OK | os.X_OK):
                raise StudyConfigError(f"{root}: cannot write the study folder there (read-only or no permission)")
        else:
            check_output(root, folder=True, what="study folder")

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Create the folder (and its parents) and hold an exclusive lock on it: two processes
        starting the same new study take turns creating its storage. If the block fails and the
        folder was created here, it is removed again with what the block put in it."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            except BaseException:
                if created:  # made by this call, under the lock: whatever is in it is ours (a half-made study.db)
                    shutil.rmtree(self.root, ignore_errors=True)
                raise
        finally:
            os.close(fd)  # releases the lock

    def write_config(self, config: StudyConfig) -> Path:
        """Write the resolved study file atomically (absolute paths, every default spelled out)."""
        import yaml

        from optimizer.atomic import write_text_atomic

        return write_text_atomic(self.config, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


#: what evomerge itself puts in a study folder
_OURS = {"study.yaml", "study.db", "study.db-journal", "study.db-wal", "study.db-shm", "artifacts", "report", "exports"}


def _comparable(config: StudyConfig) -> str:
    data = config.model_dump(mode="json")
    data.pop("storage", None)
    return json.dumps(data, sort_keys=True)


def check_sqlite_database(url: str) -> None:
    """For a ``sqlite:///`` URL: the file must exist and be a non-empty SQLite database (read-only
    commands never create or initialise one); other URLs pass."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        raise StudyConfigError(f"no study database at {path}; run `evomerge study run` first")
    if path.stat().st_size == 0:
        raise StudyConfigError(f"{path}: empty file (0 bytes), not a study database")
    with path.open("rb") as handle:
        if handle.read(16) != b"SQLite format 3\x00":
            raise StudyConfigError(f"{path}: not a SQLite database")


def open_storage(url: str, *, heartbeat: HeartbeatConfig, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeat: a trial whose process died is failed after ``grace``
    seconds and re-enqueued (up to ``max_retry`` times) by ``RetryHeartbeatStaleTrialCallback``
    (see :mod:`optimizer.study.liveness` for trials that died before their first beat).

    ``create=False`` (read-only commands): an SQLite file must already be a database, and no
    table is created in any storage."""
    if not create:
        check_sqlite_database(url)
    given, url = url, with_installed_driver(url)
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
                skip_table_creation=not create,
            )
    except Exception as exc:  # noqa: BLE001 - sqlalchemy raises many kinds
        raise StudyConfigError(f"storage {redact(given)} cannot be opened: {_storage_reason(exc)}") from None


def with_installed_driver(url: str) -> str:
    """``postgresql://...`` with the PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a
    bare ``postgresql://`` as psycopg 3, evomerge depends on psycopg2, so without psycopg 3 the URL
    becomes ``postgresql+psycopg2://...`` (an explicit ``+driver`` is kept)."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None:
        import sqlalchemy

        major, minor = (int(x) for x in sqlalchemy.__version__.split(".")[:2])
        if (major, minor) >= (2, 1) and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def redact(url: str) -> str:
    """``url`` without a password (``postgresql://user:***@host/db``)."""
    import re

    return repr(re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url))


def _storage_reason(exc: BaseException) -> str:
    """The root cause of a storage failure: optuna wraps a refused connection as "Failed to import
    DB access module"; the driver's own message (connection refused, unknown host, bad password)
    is what the user needs."""
    cause: BaseException | None = exc
    while cause is not None:
        inner = getattr(cause, "orig", None) or cause.__cause__ or cause.__context__
        if inner is None or inner is cause:
            break
        cause = inner
    text = " ".join(str(cause or exc).split())
    return text or type(exc).__name__


def config_from_study(study: optuna.Study) -> StudyConfig:
    """The study file stored in the study by the run that created it."""
    raw = study.user_attrs.get(CONFIG_ATTR)
    if raw is None:
        raise StudyConfigError(f"study {study.study_name!r} was not created by evomerge (no {CONFIG_ATTR} attribute)")
    return parse_study_config(json.loads(raw), source=f"study {study.study_name!r}")
