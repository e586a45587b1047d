"""Atomic file writes: a reader never sees a partial file, and a failed write leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """This process's umask, read without changing it (Linux /proc), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~current_umask()  # what open() would have given a new file
FOLDER_MODE = 0o777 & ~current_umask()  # what mkdir() would have given a new folder


@contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside `path`, renamed onto `path` when the block ends
    without error (concurrent writers of one path: the last rename wins) and removed otherwise.
    `fsync`: flush the bytes to disk before the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; results are shared as the user's umask says
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` through atomic_file."""
    with atomic_file(path, fsync=fsync) as handle:
        handle.write(data)
    return Path(path)
