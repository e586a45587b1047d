"""Writes the disk refused (full, over quota, read-only, not permitted), as errors that name the folder.

A full disk reaches us in three shapes: an OSError with ENOSPC (Python, pyarrow), a message with
"(os error 28)" (safetensors, written in Rust) and a bare RuntimeError (torch.save). `write_failure`
turns each into one WriteFailed whose message names the folder and its free space, so a failed run's
row and the flow's final message say which disk to look at.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
NEARLY_FULL_BYTES = 16 * 2**20  # below this, a writer's unexplained error is taken for a full disk
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteFailed(OSError):
    """A write refused by the disk or the folder; `str()` names the folder and, when full, its free space."""


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent (a folder not made yet is on that disk)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the disk holding `folder` (its nearest existing parent), None when unknown."""
    try:
        return shutil.disk_usage(existing_ancestor(folder)).free
    except OSError:
        return None


def size_text(n: float) -> str:
    """Bytes for a person: GiB from 1 GiB up, MiB below."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def write_errno(err: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or one a Rust writer put in its message,
    looked for along the exception's cause chain."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        found = _OS_ERROR.search(str(seen))
        if found:
            return int(found.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def write_failure(err: BaseException, folder: Path, *, guess_full: bool = False) -> WriteFailed | None:
    """A WriteFailed naming `folder` when `err` is a full disk or a refused write, else None.

    `guess_full`: an error without an errno (torch.save) counts as a full disk when the disk is
    nearly full now; callers whose writers always carry an errno leave it off.
    """
    if isinstance(err, WriteFailed):
        return err
    code = write_errno(err)
    free = free_bytes(folder)
    if code is None and guess_full and free is not None and free < NEARLY_FULL_BYTES:
        code = errno.ENOSPC
    if code in FULL:
        room = f", {size_text(free)} free" if free is not None else ""
        return WriteFailed(code, f"no space left on the disk holding '{folder}'{room} ({err})")
    if code in REFUSED:
        return WriteFailed(code, f"writing to '{folder}' was refused: {os.strerror(code)} ({err})")
    return None
