"""A throwaway PostgreSQL cluster for tests (a helper module, not a test file).

:func:`throwaway_postgres` finds the server binaries (``initdb``, ``pg_ctl``: on ``PATH``, then in
``/usr/lib/postgresql/*/bin``, newest first), creates a cluster in a fresh temporary folder
(``initdb -A trust -U evomerge``), starts it listening on a unix socket in that folder only
(``listen_addresses=''``, no TCP), creates a database and yields a :class:`PostgresServer` whose
``url`` is a SQLAlchemy URL (``postgresql+psycopg2://evomerge@/DB?host=<socket dir>&port=<port>``).
Afterwards the cluster is stopped (``pg_ctl stop -m immediate``) and the folder removed.

``initdb`` and ``postgres`` refuse to run as root: as root the cluster folder is handed to an
unprivileged user (``postgres`` if it exists, else ``nobody``) and the server binaries run as that
user; as any other user they run as that user. Clients (psycopg2) may connect as any OS user:
authentication is ``trust`` on the private socket.

:func:`postgres_server` and :func:`postgres_url` are module-scoped pytest fixtures (import them into
a test module) that skip with the reason when no PostgreSQL server binaries are installed
(``.ci/run`` installs the Debian package ``postgresql``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "PostgresUnavailable", "find_pg_bin", "postgres_server", "postgres_url", "throwaway_postgres"]

ROLE = "evomerge"
DATABASE = "evomerge_test"
NO_BINARIES = (
    "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in /usr/lib/postgresql/*/bin; "
    "install the Debian package `postgresql` (.ci/run does) to run the shared-storage tests"
)


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL server binaries (or no unprivileged user to run them as root)."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster: its SQLAlchemy URL and where it lives."""

    url: str
    socket_dir: Path
    port: int
    database: str
    bin_dir: Path
    log: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` (symlinks on PATH resolved), or ``None``."""
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
        candidates.append(Path(on_path).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _run_as() -> tuple[int, int] | None:
    """``(uid, gid)`` to run the server binaries as: ``None`` (this user) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry.pw_uid, entry.pw_gid
    raise PostgresUnavailable("running as root and no unprivileged user (postgres, nobody) to run initdb/postgres as")


def _free_port() -> int:
    # The server listens on a unix socket only; the port just names the socket file. A free TCP port
    # keeps the URL believable and never collides with a system server's socket.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _private_dir() -> Path:
    # Unix socket paths are limited to ~107 bytes: prefer a short folder under /tmp (world-traversable,
    # unlike pytest's per-user 0700 basetemp, which an unprivileged server user could not enter).
    base = tempfile.gettempdir()
    if len(base) > 60 or not os.access(base, os.W_OK):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="evomerge-pg-", dir=base))


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid)


@contextlib.contextmanager
def throwaway_postgres(*, database: str = DATABASE, start_timeout: int = 90) -> Iterator[PostgresServer]:
    """Create, start, yield and finally stop a private PostgreSQL cluster (see the module docstring).

    Raises :class:`PostgresUnavailable` when there are no server binaries; a cluster that cannot be
    created or started raises ``RuntimeError`` with the server's log (a broken install is a failure).
    """
    bin_dir = find_pg_bin()
    if bin_dir is None:
        raise PostgresUnavailable(NO_BINARIES)
    owner = _run_as()
    root = _private_dir()
    data, log = root / "data", root / "server.log"
    port = _free_port()
    if owner is not None:
        _chown_tree(root, *owner)
    as_owner = {} if owner is None else {"user": owner[0], "group": owner[1], "extra_groups": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")

    def pg(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout, **as_owner)
        if check and done.returncode != 0:
            server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{server_log}")
        return done

    started = False
    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", ROLE, "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-k {root} -p {port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=100")
        started = True  # from here on stop it, even if `pg_ctl start` gave up waiting
        pg("pg_ctl", "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", str(start_timeout), "start",
           timeout=start_timeout + 30)
        _create_database(root, port, database)
        url = f"postgresql+psycopg2://{ROLE}@/{database}?host={root}&port={port}"
        yield PostgresServer(url=url, socket_dir=root, port=port, database=database, bin_dir=bin_dir, log=log)
    finally:
        if started:
            stopped = pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60, check=False)
            if stopped.returncode != 0:
                _kill_postmaster(data)
        shutil.rmtree(root, ignore_errors=True)


def _kill_postmaster(data: Path) -> None:
    """Last resort when ``pg_ctl stop`` failed: kill the postmaster this helper started (by its pid file)."""
    import signal

    try:
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


def _create_database(socket_dir: Path, port: int, database: str) -> None:
    import psycopg2

    deadline = time.monotonic() + 30
    while True:
        try:
            conn = psycopg2.connect(dbname="postgres", user=ROLE, host=str(socket_dir), port=port)
            break
        except psycopg2.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{database}"')
    finally:
        conn.close()


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway cluster with a fresh database (skips without PostgreSQL binaries or psycopg2)."""
    pytest.importorskip("psycopg2", reason="psycopg2 (psycopg2-binary) is not installed")
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_postgres())
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
        yield server


@pytest.fixture(scope="module")
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of that database: ``postgresql+psycopg2://evomerge@/evomerge_test?host=...&port=...``."""
    return postgres_server.url
