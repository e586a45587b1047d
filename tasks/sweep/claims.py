"""Claims on shared work, across threads, processes and machines that share the output folder.

`claim` holds an exclusive `flock` on a lock file while one piece of work (a training run, a
render job, a flow run of the sweep) is done. A second claimant waits for it, then finds the
work finished and skips it. The kernel drops the lock when its holder dies, so a killed holder
never leaves a stale claim behind, and `holder_is_gone` tells a dead holder from a live one
without waiting. `record_holder` appends who did the work to a JSON-lines log, one line per
attempt, so duplicated work would show.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from storage.cleanup import lock_probe


def holder_identity() -> dict[str, object]:
    """Who holds a claim: host, process, and the Prefect worker and flow run when there is one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(),
            "worker": os.environ.get("PREFECT__WORKER_NAME"),
            "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def open_lock(lock_path: Path) -> int:
    """A descriptor on the lock file, created (with its folder) when missing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)


def take_lock(fd: int, label: str) -> None:
    """Lock `fd` exclusively, waiting (and saying for whom) while another holder has it; then sign it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        print(f"{label} is claimed by {holder}; waiting for it to finish")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_identity()).encode(), 0)


@contextmanager
def claim(lock_path: Path, label: str) -> Iterator[None]:
    """Hold the lock at `lock_path` for the block; blocks while another process or thread holds it.

    `label` names the work in the message printed while waiting ("run <id>", "render <id>").
    """
    fd = open_lock(lock_path)
    try:
        take_lock(fd, label)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def holder_is_gone(lock_path: Path) -> bool:
    """True when nobody holds the lock at `lock_path` (its holder ended or was killed), without waiting.

    A missing file counts as gone. The check takes the lock for an instant, so call it only on
    locks whose work is not waiting to be claimed (a flow run's liveness lock, not a render's).
    """
    return lock_probe(lock_path) in ("free", "missing")


def record_holder(log_path: Path, **fields: object) -> None:
    """Append this process's identity and `fields` to a claim's log (call it only while holding the claim)."""
    line = {**fields, **holder_identity(), "started_at": datetime.now(timezone.utc).isoformat()}
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def read_holders(log_path: Path) -> list[dict[str, object]]:
    """Every attempt recorded in a claim's log, oldest first."""
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
