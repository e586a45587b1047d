"""One trainer per run id, across threads, processes and machines that share the output folder.

`claim_run` holds the run's claim (`runs/<run_id>/train.lock`, see tasks.sweep.claims) while a
run trains. A second claimant (a duplicate flow run, a second sweep with the same run, a retry)
waits for it, then finds the finished checkpoints and skips. A killed trainer never leaves a
stale claim behind. `record_trainer` appends who trained to `trained_by.jsonl`, one line per
training attempt, so duplicates would show.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.sweep.claims import claim, read_holders, record_holder

LOCK_FILE = "train.lock"
TRAINERS_FILE = "trained_by.jsonl"


@contextmanager
def claim_run(run_dir: Path) -> Iterator[None]:
    """Hold the run's training lock; blocks while another process or thread holds it."""
    with claim(run_dir / LOCK_FILE, f"run {run_dir.name}"):
        yield


def record_trainer(run_dir: Path, run_id: str) -> None:
    """Append this process's identity to the run's trainer log (called only while holding the claim)."""
    record_holder(run_dir / TRAINERS_FILE, run_id=run_id)


def read_trainers(run_dir: Path) -> list[dict[str, object]]:
    """Every recorded training attempt of a run, oldest first."""
    return read_holders(run_dir / TRAINERS_FILE)
