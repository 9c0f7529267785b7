"""Atomic output: write into a temporary sibling, rename into place only when complete.

Atomic against failures and kills of the compile: an exception removes the temporary sibling,
and a small watcher process (its own session, so a Ctrl-C or a group kill does not reach it)
removes it when the compile dies without saying it is done, SIGKILL included. Like cp, tar and
save_pretrained it leaves flushing to the operating system (run `sync` where power loss must not
lose a fresh artifact).

Nothing of the user's is lost (output_guard): the output is never an input, and is replaced only
when it is empty or Adaptrix wrote it. One writer per output at a time: a lock file beside it,
held with flock, and a final rename that never replaces what appeared meanwhile. A temporary
holds a marker file naming its process; only a marked temporary of a dead process is removed as
a leftover, never a folder that merely has the name.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from adaptrix.io.output_guard import check_output, check_replaceable
from adaptrix.ir.errors import BadInputError

__all__ = ["MARKER", "atomic_entry", "atomic_file", "atomic_output", "remove_stale"]

logger = logging.getLogger(__name__)

MARKER = ".adaptrix-temporary"  # inside every temporary Adaptrix makes; holds its process id
_LOCK = ".adaptrix-lock"
_STALE = re.compile(r"\.(?P<name>.+)\.adaptrix-(?P<kind>tmp|old)-(?P<pid>[0-9]+)")
# The watcher: reads its stdin until "done" or EOF; at EOF (the compile died) it removes the
# temporary sibling, puts back a previous output the compile had moved aside, and drops the lock.
_WATCHER = """
import fcntl, os, shutil, sys, time
tmp, out, old, lock, marker = sys.argv[1:6]
if sys.stdin.read() != "done":
    shutil.rmtree(tmp, ignore_errors=True)
    if old and os.path.isfile(os.path.join(old, marker)):
        if os.path.lexists(out):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(os.path.join(old, marker))
            os.rename(old, out)
    if lock and os.path.exists(lock):
        fd = os.open(lock, os.O_RDWR)
        for _ in range(500):  # the dying compile may close the lock after this pipe
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.unlink(lock)
            break
        os.close(fd)
"""


class _Watcher:
    """Removes `tmp` (and restores `out` from `old`) if this process dies before `done()`."""

    def __init__(self, tmp: Path, out: Path, old: Path | None = None, lock: Path | None = None):
        args = [str(tmp), str(out), str(old or ""), str(lock or ""), MARKER]
        self._process = subprocess.Popen(
            [sys.executable, "-S", "-E", "-c", _WATCHER, *args],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True, text=True,
        )  # fmt: skip

    def done(self) -> None:
        """The output is in place or cleaned up by this process: the watcher has nothing to do."""
        try:
            self._process.communicate("done", timeout=10)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self._process.kill()


@contextmanager
def atomic_output(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`, else vanishes."""
    with _claimed(out, force, inputs, "directory") as (target, tmp):
        yield tmp
        _publish_folder(tmp, target, force, given=Path(out).absolute())


@contextmanager
def atomic_file(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary file name beside `out`; on success it replaces `out`, else it is removed."""
    with _claimed(out, force, inputs, "file") as (target, tmp):
        yield tmp / target.name
        given = Path(out).absolute()
        if os.path.lexists(target):
            check_replaceable(target, force=force, kind="file", given=given)
            os.replace(tmp / target.name, target)
        elif not _rename_noreplace(tmp / target.name, target):
            raise _appeared(given)


@contextmanager
def atomic_entry(entry: Path) -> Iterator[Path]:
    """Yield a temporary sibling of cache entry `entry`; it becomes `entry` unless one was made meanwhile."""
    remove_stale(entry.parent)
    tmp = _temporary(entry)
    watcher = _Watcher(tmp, entry)
    try:
        yield tmp
        (tmp / MARKER).unlink()
        if not _rename_noreplace(tmp, entry):
            logger.info("another process cached %s meanwhile; keeping its copy", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        watcher.done()


def remove_stale(folder: Path, name: str | None = None) -> None:
    """Remove temporaries (of `name`, else of any name) that killed runs left in `folder`."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for each in names:
        found = _STALE.fullmatch(each)
        if found is None or (name is not None and found["name"] != name):
            continue
        stale = folder / each
        if not _is_left_over(stale, found["pid"]):
            continue
        out = folder / found["name"]
        if found["kind"] == "old" and not os.path.lexists(out):
            logger.info("restoring %s, moved aside by an interrupted run", out)
            (stale / MARKER).unlink()
            _rename_noreplace(stale, out)
        else:
            logger.info("removing %s, left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def _claimed(out: Path, force: bool, inputs: Sequence[Path], kind: str) -> Iterator[tuple[Path, Path]]:
    """Check `out`, lock it, and yield (its resolved path, a fresh marked temporary beside it)."""
    given = Path(out).absolute()
    target = check_output(given, force=force, inputs=inputs, kind=kind)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create its folder ({exc.strerror or exc})", path=given,
                            fix="choose an -o in a folder you can write") from None  # fmt: skip
    with _locked(target, given):
        remove_stale(target.parent, target.name)  # may put back an output a killed run moved aside
        check_replaceable(target, force=force, kind=kind, given=given)  # again, now that it is ours
        tmp = _temporary(target)
        watcher = _Watcher(tmp, target, _aside(target), _lock_file(target))
        try:
            yield target, tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            watcher.done()


@contextmanager
def _locked(target: Path, given: Path) -> Iterator[None]:
    """Hold `target`'s lock file (flock) while the body runs; refuse if another process holds it."""
    lock = _lock_file(target)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BadInputError(f"cannot write beside it ({exc.strerror or exc})", path=given,
                                fix="choose an -o in a folder you can write") from None  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BadInputError("another Adaptrix process is writing this output now", path=given,
                                fix="wait for it to finish, or choose another -o") from None  # fmt: skip
        if _still_at(fd, lock):
            break
        os.close(fd)  # the holder removed it between our open and our lock: take the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _still_at(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _temporary(target: Path) -> Path:
    """A fresh temporary folder beside `target`, with the marker that proves it is Adaptrix's."""
    tmp = target.parent / f".{target.name}.adaptrix-tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        if not (tmp / MARKER).is_file():
            raise BadInputError("is in the way and was not made by Adaptrix", path=tmp, fix=_MOVE)
        shutil.rmtree(tmp)  # an earlier run of a process with our id
    tmp.mkdir()
    (tmp / MARKER).write_text(f"{os.getpid()}\n")
    return tmp


_MOVE = "move it elsewhere, then run again"


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.adaptrix-old-{os.getpid()}"


def _lock_file(target: Path) -> Path:
    return target.parent / f".{target.name}{_LOCK}"


def _publish_folder(tmp: Path, target: Path, force: bool, given: Path) -> None:
    """Rename the finished `tmp` to `target`, replacing a previous output only under --force."""
    (tmp / MARKER).unlink()
    if not os.path.lexists(target):
        if not _rename_noreplace(tmp, target):
            raise _appeared(given)
        return
    if not force:
        raise _appeared(given)
    check_replaceable(target, force=True, kind="directory", given=given)
    old = _aside(target)
    if os.path.lexists(old):
        raise BadInputError("is in the way and was not made by this run", path=old, fix=_MOVE)
    target.rename(old)
    (old / MARKER).write_text(f"{os.getpid()}\n")
    if not _rename_noreplace(tmp, target):  # something took the name in the instant between
        (old / MARKER).unlink()  # unmarked: never removed as a leftover
        raise BadInputError(f"was created by someone else meanwhile; the previous output is kept at {old}",
                            path=given, fix="choose another -o")  # fmt: skip
    shutil.rmtree(old)


def _appeared(given: Path) -> BadInputError:
    return BadInputError("was created by someone else meanwhile; it is left as it is", path=given,
                         fix="choose another -o, or pass --force to replace an Adaptrix output")  # fmt: skip


def _is_left_over(stale: Path, pid: str) -> bool:
    """A temporary of a process that is gone, proven Adaptrix's by its marker (or empty)."""
    if stale.is_symlink() or not stale.is_dir() or _alive(int(pid)):
        return False
    try:
        with (stale / MARKER).open("rb") as handle:
            return handle.read(32).strip() == pid.encode()
    except FileNotFoundError:
        with suppress(OSError):
            stale.rmdir()  # empty: killed before its marker was written; nothing is lost
        return False
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless `dst` exists (atomically where the kernel can); False if it did."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            return False
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
    if os.path.lexists(dst):  # no renameat2 here: check, then rename (a narrow race remains)
        return False
    os.rename(src, dst)
    return True
