"""Atomic output: write into a temporary sibling, rename into place only when complete.

Atomic against failures and kills of the compile: an exception removes the temporary sibling,
and a small watcher process (its own session, so a Ctrl-C or a group kill does not reach it)
removes it when the compile dies without saying it is done, SIGKILL included. Like cp, tar and
save_pretrained it leaves flushing to the operating system (run `sync` where power loss must not
lose a fresh artifact).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adaptrix.toolchain.errors import BadInputError

__all__ = ["atomic_file", "atomic_output"]

logger = logging.getLogger(__name__)

_TMP = ".adaptrix-tmp-"
# The watcher: reads its stdin until "done" or EOF; at EOF (the compile died) it removes the
# temporary sibling and puts back a previous output the compile had moved aside.
_WATCHER = """
import os, shutil, sys
tmp, out, old = sys.argv[1:4]
if sys.stdin.read() != "done":
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
        os.unlink(tmp)
    if os.path.exists(old):
        if os.path.exists(out):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)
"""


class _Watcher:
    """Removes `tmp` (and restores `out` from `old`) if this process dies before `done()`."""

    def __init__(self, tmp: Path, out: Path, old: Path):
        self._process = subprocess.Popen(
            [sys.executable, "-S", "-E", "-c", _WATCHER, str(tmp), str(out), str(old)],
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
    out = out.absolute()
    _check_target(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}"
    old = out.parent / f".{out.name}.adaptrix-old-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    watcher = _Watcher(tmp, out, old)
    try:
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if out.exists():
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        watcher.done()


@contextmanager
def atomic_file(out: Path, *, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling file name; on success it replaces `out`, else it is removed."""
    out = out.absolute()
    _check_inputs(out, inputs, "file")
    if out.is_dir():
        raise BadInputError("is a directory", path=out, fix="give -o the name of the file to write")
    if out.exists() and not force:
        raise BadInputError("already exists", path=out, fix="pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}"
    tmp.unlink(missing_ok=True)
    watcher = _Watcher(tmp, out, out.parent / f".{out.name}.adaptrix-old-{os.getpid()}")
    try:
        try:
            yield tmp
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(out)
    finally:
        watcher.done()


def _check_inputs(out: Path, inputs: Sequence[Path], kind: str) -> None:
    for given in inputs:
        path = given.absolute()
        if out == path or out in path.parents:
            raise BadInputError(
                f"would overwrite the input {given}",
                path=out,
                fix=f"choose another output {kind}",
            )


def _check_target(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    _check_inputs(out, inputs, "directory")
    if out.exists() and not out.is_dir():
        raise BadInputError("exists and is not a directory", path=out, fix="choose another -o")
    if out.exists() and not force:
        raise BadInputError("already exists", path=out, fix="pass --force to replace it")


def _remove_stale(out: Path) -> None:
    """Remove temporary siblings left by a killed run of an earlier process."""
    for stale in out.parent.glob(f".{out.name}.adaptrix-*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            logger.info("removing %s, left by an interrupted run", stale)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
