"""Atomic file writes: a reader never sees a partial file, and a failed write leaves nothing behind.

A temporary file is named `.NAME.<host>.<pid>.<random>.tmp` and locked (`flock`) by its writer until
it is renamed onto NAME, so a write killed mid-way leaves a leftover that storage.cleanup can tell from
a live writer's file and remove.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NoReturn

from storage.disk import write_failure

TEMP_SUFFIX = ".tmp"
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"  # no dots: the name stays parseable
# `.NAME.<host>.<pid>.<8 random>.tmp`; names written before the owner was recorded lack host and pid.
TEMP_NAME = re.compile(r"^\.(?P<target>.+?)(?:\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+))?\.[a-z0-9_]{8}\.tmp$")


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


UMASK = current_umask()
FILE_MODE = 0o666 & ~UMASK  # what open() would have given a new file
FOLDER_MODE = 0o777 & ~UMASK  # what mkdir() would have given a new folder


def temp_prefix(name: str) -> str:
    """The start of a temporary name for a file NAME: it names the target and the writing process."""
    return f".{name}.{HOST}.{os.getpid()}."


def hold_writer_lock(fd: int) -> int:
    """A second descriptor holding an exclusive flock on the temporary file until it is closed; storage.cleanup
    leaves locked files alone. A filesystem without locks: cleanup then goes by the owner and age alone."""
    lock = os.dup(fd)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
    except OSError:
        pass
    return lock


def raise_explained(err: OSError, folder: Path) -> NoReturn:
    """Raise `err` as a WriteFailed naming `folder` when the disk or folder refused the write, else as it is."""
    failure = write_failure(err, folder)
    if failure is None or failure is err:
        raise err
    raise failure from err


@contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary handle on a temporary file beside `path`, renamed onto `path` when the block ends
    without error (concurrent writers of one path: the last rename wins) and removed otherwise.
    `fsync`: flush the bytes to disk before the rename. A full disk or a refused write raises
    storage.disk.WriteFailed naming the folder."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise_explained(err, path.parent)
    lock = hold_writer_lock(fd)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600; results are shared as the user's umask says
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise_explained(err, path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)


def write_atomic(path: Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` through atomic_file."""
    with atomic_file(path, fsync=fsync) as handle:
        handle.write(data)
    return Path(path)
