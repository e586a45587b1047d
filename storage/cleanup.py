"""Remove what killed writers left behind: temporary files of storage.atomic that no live writer owns.

A write killed mid-way (SIGKILL, a lost machine) leaves `.NAME.<host>.<pid>.<random>.tmp` beside
NAME. Such a file is stale, and removed, when no process holds its writer lock (storage.atomic) and
either its writer was on this machine and is gone, or nobody has changed it for FRESH_S. A live
writer's file is never touched: it holds the lock from its first microseconds until the rename, and
its own process is alive. The other writers' leftovers are removed under their own locks: partial
checkpoint folders by the run's trainer (tasks.train.child_process), catalog files by the catalog
builder (storage.catalog).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from storage.atomic import HOST, TEMP_NAME

FRESH_S = 600.0  # an unlocked temporary file of another machine's writer, unchanged this long, is stale


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_probe(path: Path) -> Literal["held", "free", "missing", "unknown"]:
    """Whether anyone holds the flock on `path`, without waiting: the probe takes a free lock for an
    instant. "unknown" when the file cannot be opened or locked (a link, no permission)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "missing"
    except OSError:
        return "unknown"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError:
        return "unknown"
    finally:
        os.close(fd)  # also lets go of the lock when this probe took it
    return "free"


def writer_lock_held(path: Path) -> bool:
    """Whether a writer holds the file's lock; a file that vanished meanwhile counts as held (its
    writer renamed it), one whose lock cannot be tested as not held."""
    return lock_probe(path) in ("held", "missing")


def is_stale_temp_file(path: Path, now: float | None = None) -> bool:
    """A storage.atomic temporary file that no live writer will ever rename (see the module docstring)."""
    match = TEMP_NAME.match(path.name)
    if match is None or writer_lock_held(path):
        return False
    if match["host"] == HOST and not process_alive(int(match["pid"])):
        return True
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > FRESH_S


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Remove every stale temporary file under `folder`; hidden folders (a checkpoint being assembled,
    a build in progress) are left to their own writers. Returns what was removed."""
    removed = []
    for parent, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            path = Path(parent) / name
            if TEMP_NAME.match(name) and is_stale_temp_file(path):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def remove_leftovers(folders: Iterable[Path]) -> list[Path]:
    """remove_stale_temp_files over several folders (missing ones are skipped)."""
    return [path for folder in folders for path in remove_stale_temp_files(Path(folder))]
