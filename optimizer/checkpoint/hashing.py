"""Checkpoint hashes as A1111 reports them.

- ``sha256``: the full SHA-256 of the file (A1111's "hash" since 2023, civitai's "SHA256").
- short hash: its first 10 hex characters (what A1111 shows in infotext, ``Model hash: ...``).
- legacy hash: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex characters (A1111 before 2023).

Full hashes of large files are cached in ``$EVOMERGE_CACHE/hashes.json`` (default
``~/.cache/evomerge``) keyed by absolute path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_CHUNK = 1 << 20


def cache_root() -> Path:
    """The evomerge cache folder (``$EVOMERGE_CACHE`` or ``~/.cache/evomerge``)."""
    return Path(os.environ.get("EVOMERGE_CACHE") or "~/.cache/evomerge").expanduser()


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict[str, str]) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home must not stop a merge; the hash is simply recomputed next time


def sha256_file(path: str | os.PathLike[str], *, use_cache: bool = True) -> str:
    """Full SHA-256 hex digest of a file, cached by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    cache_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = _read_cache() if use_cache else {}
    if cache_key in cache:
        return cache[cache_key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if use_cache:
        cache[cache_key] = value
        _write_cache(cache)
    return value


def short_hash(sha256: str) -> str:
    """A1111's short hash: the first 10 hex characters of the full SHA-256."""
    return sha256[:10]


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """A1111's legacy model hash: sha256 of 0x10000 bytes at offset 0x100000, first 8 hex chars."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def sha256_folder(path: str | os.PathLike[str], *, patterns: tuple[str, ...] = ("*.safetensors", "*.bin")) -> str:
    """Hash of a diffusers folder: sha256 of the sorted ``relative/path sha256`` lines of its weight files."""
    root = Path(path)
    files = sorted({f for pattern in patterns for f in root.rglob(pattern) if f.is_file()})
    lines = "".join(f"{f.relative_to(root).as_posix()} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()
