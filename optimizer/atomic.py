"""Writing outputs atomically, and checking an output path before any work is done.

Contract:

- A file or folder is written into a temporary sibling, then renamed onto the target: a reader
  (or a crash) sees the old output or the new one, never half of one; on any error the temporary
  is removed and the target is untouched.
- Temporaries are named ``.<target name>.evomerge-<host>-<pid>-<random>.tmp``: a later write of
  the same target removes those left by a process of this host that no longer runs (``kill -9``
  during an export), and never anything else.
- Outputs get the permissions a plain ``open(path, "w")`` / ``mkdir`` would give (``0666`` /
  ``0777`` minus the umask), not the private ``0600`` / ``0700`` of ``mkstemp`` / ``mkdtemp``.
- :func:`check_output` refuses, before anything is loaded or written, a target that exists
  (unless ``overwrite``), a folder given where a file goes or the reverse, a non-empty folder that
  evomerge did not write, and a destination folder that cannot be written (read-only file system,
  no permission).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from optimizer.errors import InputError

__all__ = [
    "OutputError",
    "atomic_file",
    "atomic_folder",
    "check_output",
    "clean_stale_temporaries",
    "write_atomic",
    "write_bytes_atomic",
    "write_text_atomic",
]

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


class OutputError(InputError):
    """An output path that cannot be written as asked (the message names it and says why)."""


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prefix(path: Path) -> str:
    return f".{path.name}.evomerge-"


def _temporary_prefix(path: Path) -> str:
    return f"{_prefix(path)}{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove this host's leftover temporaries of ``path`` whose writing process is gone; returns them."""
    path = Path(path)
    pattern = re.compile(re.escape(_prefix(path)) + r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-.*\.tmp$")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing folder above ``path`` (where its missing parents would be created)."""
    parent = path.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    return parent


def check_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    folder: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
    what: str = "output",
) -> Path:
    """``path`` if an output can be written there; else :class:`OutputError` naming it.

    ``folder``: the output is a folder (a diffusers folder) rather than a file. An existing target
    needs ``overwrite``, and then must be of the same kind; an existing folder is replaced only when
    ``replaceable(folder)`` says evomerge wrote it (without ``replaceable``: only an empty folder).
    The folder the output goes into (or its nearest existing ancestor) must be writable."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        if folder:
            if not path.is_dir():
                raise OutputError(f"{path}: is a file, not a folder; the {what} is a folder, give another path")
            if any(path.iterdir()) and not (replaceable and replaceable(path)):
                raise OutputError(
                    f"{path}: not a folder evomerge wrote (it holds other files); --overwrite only replaces its own "
                    "outputs, give a new or empty folder"
                )
        else:
            if path.is_dir():
                raise OutputError(f"{path}: is a folder; the {what} is a file, give a file name")
            if not path.is_file():
                raise OutputError(f"{path}: not a regular file; the {what} cannot replace it")
    elif folder is False and path.name in ("", ".", ".."):
        raise OutputError(f"{path}: give a file name for the {what}")
    parent = _writable_ancestor(path)
    if not parent.is_dir():
        raise OutputError(f"{parent}: not a folder; the {what} {path} cannot be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only file system" if _read_only(parent) else "permission denied"
        raise OutputError(f"{parent}: cannot write the {what} there ({why})")
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _fix_mode(path: Path, *, folder: bool) -> None:
    mask = umask()
    if not folder:
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (its folder must exist); when the block
    succeeds the file replaces ``path``, else it is removed."""
    path = Path(path)
    clean_stale_temporaries(path)
    try:
        fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fix_mode(tmp, folder=False)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` (it must create that file), then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        write(str(tmp))
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """``data`` into ``path``, atomically."""
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds it replaces
    ``path`` (an existing folder is moved aside first and removed only after the rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    try:
        yield tmp
        _fix_mode(tmp, folder=True)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), suffix=".tmp", dir=target.parent))
            os.rename(target, trash / "old")
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(trash / "old", target)
                shutil.rmtree(trash, ignore_errors=True)
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
