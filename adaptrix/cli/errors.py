"""One actionable line for an error the CLI meets that is not an AdaptrixError (file system, input)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

__all__ = ["INPUT_ERRORS", "describe"]

# What input files and the file system can raise past the frontends' own checks.
INPUT_ERRORS = (
    OSError,
    RecursionError,
    OverflowError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    MemoryError,
)

_DEBUG = "rerun with --debug to see where"
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space there, or write the output to another disk with -o",
    errno.EDQUOT: "your disk quota is used up: free space, or write the output elsewhere with -o",
    errno.EACCES: "fix the permissions of {name} (or of {parent}), or choose another path",
    errno.EPERM: "fix the permissions of {name} (or of {parent}), or choose another path",
    errno.EROFS: "it is on a read-only file system: write the output elsewhere with -o",
    errno.ENOENT: "check that the path exists and is spelled right",
    errno.ENOTDIR: "a regular file stands where a directory is expected: pass a directory, or move the file",
    errno.EISDIR: "a directory stands where a file is expected: pass a file",
    errno.EEXIST: "something already exists there: remove it or choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.ELOOP: "the path goes through a loop of symbolic links: fix the links",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n) and rerun",
    errno.EIO: "the disk reported an I/O error: check the disk and copy the file again",
}


def describe(exc: BaseException, writing: Path | None = None) -> str:
    """`exc` as one line: what failed, on which file, and what to do."""
    if isinstance(exc, OSError):
        return _os_error(exc, writing)
    kind = type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory (MemoryError): an input declares sizes too large for this machine; {_DEBUG}"
    if isinstance(exc, RecursionError):
        return f"an input nests too deeply to read (RecursionError); {_DEBUG}"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not valid UTF-8 text (UnicodeDecodeError: {_flat(exc)}); {_DEBUG}"
    if isinstance(exc, KeyError):
        return f"an input lacks an entry Adaptrix needs (KeyError: {_flat(exc)}); {_DEBUG}"
    return f"an input holds a value Adaptrix cannot use ({kind}: {_flat(exc)}); {_DEBUG}"


def _os_error(exc: OSError, writing: Path | None) -> str:
    """An OSError with its file (or the output being written), its cause and the fix."""
    code = errno.errorcode.get(exc.errno or 0)
    cause = exc.strerror or _flat(exc) or type(exc).__name__
    cause = f"{cause} ({code})" if code else cause
    target = _path(exc.filename) or writing
    if exc.filename is not None:
        where = str(target) + (f" -> {_path(exc.filename2)}" if exc.filename2 is not None else "")
    else:
        where = f"while writing {writing}" if writing is not None else "a file"
    number = exc.errno or 0
    if number == errno.EEXIST and target is not None and target.is_file():
        number = errno.ENOTDIR  # `mkdir -p` through a regular file
    fix = _OS_FIXES.get(number, f"check the path and rerun; {_DEBUG}")
    fix = fix.format(name=target or "the file", parent=target.parent if target else "its folder")
    return f"{where}: {cause}; {fix}"


def _path(name: object) -> Path | None:
    """An OSError's file name as a path (None when it has none)."""
    if name is None:
        return None
    return Path(os.fsdecode(name)) if isinstance(name, str | bytes | os.PathLike) else Path(str(name))


def _flat(exc: BaseException) -> str:
    """The exception's text on one line (a KeyError's key without repr quotes doubled)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split())
