"""One trainer per run id, across threads, processes and machines that share the output folder.

`claim_run` holds an exclusive `flock` on `runs/<run_id>/train.lock` while a run trains. A
second claimant (a duplicate flow run, a second sweep with the same run, a retry) waits for
it, then finds the finished checkpoints and skips. The kernel drops the lock when its holder
dies, so a killed trainer never leaves a stale claim behind. `record_trainer` appends who
trained to `trained_by.jsonl`, one line per training attempt, so duplicates would show.
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

LOCK_FILE = "train.lock"
TRAINERS_FILE = "trained_by.jsonl"


def trainer_identity() -> dict[str, object]:
    """Who is training: host, process, and the Prefect worker and flow run when there is one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "parent_pid": os.getppid(),
            "worker": os.environ.get("PREFECT__WORKER_NAME"),
            "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@contextmanager
def claim_run(run_dir: Path) -> Iterator[None]:
    """Hold the run's training lock; blocks while another process or thread holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            print(f"run {run_dir.name} is being trained by {holder}; waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(trainer_identity()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def record_trainer(run_dir: Path, run_id: str) -> None:
    """Append this process's identity to the run's trainer log (called only while holding the claim)."""
    line = {"run_id": run_id, **trainer_identity(), "started_at": datetime.now(timezone.utc).isoformat()}
    with open(run_dir / TRAINERS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def read_trainers(run_dir: Path) -> list[dict[str, object]]:
    """Every recorded training attempt of a run, oldest first."""
    path = run_dir / TRAINERS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
