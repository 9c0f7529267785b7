"""sha256 of input files, with a cache keyed by file identity so an unchanged base is hashed once.

Like git's index, a cached digest is reused only while the file's device, inode, size, mtime and
ctime are all unchanged (ctime cannot be set back by tools such as `touch`), and a file changed
in the last two seconds is never cached. Set ADAPTRIX_HASH_CACHE=0 to always hash.
`hash_early` starts hashing files on a background thread, for a later `hash_files` call to pick
up: a compile starts on its base before it loads torch, so the base is hashed while the import
holds one core and the other is idle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from adaptrix.io import staging
from adaptrix.io.jsonfile import read_json
from adaptrix.ir.errors import BadInputError

__all__ = ["files_key", "hash_early", "hash_files", "sha256_file"]

logger = logging.getLogger(__name__)

_SETTLE_SECONDS = 2.0
_CHUNK = 8 << 20
_early: dict[str, tuple[str, Future]] = {}  # path -> (identity when started, digest)


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read with direct I/O where the file system allows it."""
    fd, direct = staging.open_input(path)
    try:
        if direct:
            try:
                return _sha256_direct(fd)
            except OSError as exc:
                staging.direct_refused(fd, exc)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    finally:
        os.close(fd)


def _sha256_direct(fd: int) -> str:
    digest = hashlib.sha256()
    buffer = staging.POOL.take(_CHUNK)
    try:
        view, offset = memoryview(buffer[:_CHUNK]), 0
        while got := os.preadv(fd, [view], offset):
            digest.update(view[:got])
            offset += got
    finally:
        staging.POOL.give(buffer)
    return digest.hexdigest()


def _cache_file() -> Path | None:
    if os.environ.get("ADAPTRIX_HASH_CACHE", "1") == "0":
        return None
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "adaptrix" / "sha256.json"


def _identity(path: Path) -> tuple[str, str]:
    st = path.stat()
    return str(path.resolve()), f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _load(cache: Path | None) -> dict:
    """The cache's entries, path -> [identity, digest]; a damaged cache or entry is ignored."""
    if cache is None or not cache.is_file():
        return {}
    try:
        loaded = read_json(cache, what="hash cache")
    except BadInputError as exc:
        logger.warning("ignoring unreadable hash cache %s: %s", cache, exc.message)
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {key: entry for key, entry in loaded.items() if _entry_fits(entry)}


def _entry_fits(entry: object) -> bool:
    """Whether a cache entry is [identity, sha256 hex digest]."""
    return (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)
            and len(entry[1]) == 64)  # fmt: skip


def _save(cache: Path, entries: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, sort_keys=True))
        tmp.replace(cache)
    except OSError as exc:
        logger.warning("could not update hash cache %s: %s", cache, exc)


def hash_early(files: Sequence[Path]) -> None:
    """Start hashing the files the cache does not know, in order, on one daemon thread."""
    entries = _load(_cache_file())
    jobs = []
    for f in files:
        key, ident = _identity(f)
        started = _early.get(key)
        if started is not None and started[0] == ident:
            continue  # already hashing (the CLI started it, then compile_adapter asked again)
        if not (key in entries and entries[key][0] == ident):
            jobs.append((f, Future()))
            _early[key] = (ident, jobs[-1][1])
    if jobs:  # a daemon: a compile that fails early exits at once, not after the hashing
        threading.Thread(target=_hash_jobs, args=(jobs,), name="adaptrix-sha256-early", daemon=True).start()


def _hash_jobs(jobs: list[tuple[Path, Future]]) -> None:
    for f, digest in jobs:
        try:
            digest.set_result(sha256_file(f))
        except OSError as exc:
            digest.set_exception(exc)


def hash_files(files: Sequence[Path], workers: int = 2) -> dict[Path, str]:
    """sha256 of each file, hashed on `workers` threads (hashlib frees the GIL), cached by identity."""
    cache = _cache_file()
    entries = _load(cache)
    identities = {f: _identity(f) for f in files}
    digests = {f: entries[key][1] for f, (key, ident) in identities.items()
               if key in entries and entries[key][0] == ident}  # fmt: skip
    fresh = [f for f in files if f not in digests]
    for f in fresh:
        key, ident = identities[f]
        started = _early.pop(key, None)
        if started is not None and started[0] == ident:
            digests[f] = started[1].result()  # hashed early, and unchanged since
    todo = [f for f in fresh if f not in digests]
    if todo:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adaptrix-sha256") as pool:
            digests.update(zip(todo, pool.map(sha256_file, todo), strict=True))
    if cache is not None and fresh:
        now = time.time_ns()
        for f in fresh:
            key, ident = identities[f]
            if (now - f.stat().st_mtime_ns) / 1e9 > _SETTLE_SECONDS and _identity(f)[1] == ident:
                entries[key] = [ident, digests[f]]
        _save(cache, entries)
    return digests


def files_key(files: Sequence[Path], **parts: object) -> str:
    """A cache entry's key: sha256 of the JSON of `parts` and the files' digests by name."""
    digests = hash_files(files)
    keyed = {**parts, "files": {f.name: digests[f] for f in files}}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()
