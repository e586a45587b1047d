"""Run one training run in a child process.

The child returns all its memory (GPU memory included) to the system when it exits, a crash
or an out-of-memory kill cannot take the flow down with it, and model loading never races with
other threads. Finished runs are found here, before any process starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from storage.atomic import write_atomic
from storage.disk import write_failure
from storage.layout import SweepLayout
from tasks.lora.files import remove_partial_checkpoints
from tasks.sweep.devices import cpu_threads_per_task
from tasks.sweep.plan import TrainingRunSpec
from tasks.train.claim import claim_run, record_trainer
from tasks.train.records import (
    ERROR_FD_ENV,
    TrainingResult,
    already_done,
    completed,
    error_text,
    read_reported,
    record_failure,
    recorded_error,
    write_run_row,
)


class TrainingFailed(RuntimeError):
    """A training run ended without finishing; its `runs` row holds the same message."""


def train_in_subprocess(run: TrainingRunSpec) -> TrainingResult:
    """Train `run` in `python -m tasks.train.run`; raise TrainingFailed with the run's error if it fails.

    The run's claim makes this the only trainer of `run` on every machine sharing the output
    folder: a second caller waits, then finds the finished run.
    """
    layout = SweepLayout(Path(run.sweep_root))
    if already_done(run, layout):
        return completed(run, layout)
    run_dir = layout.run_dir(run.run_id)
    try:
        with claim_run(run_dir):
            if already_done(run, layout):  # finished by the claim's previous holder
                return completed(run, layout)
            record_trainer(run_dir, run.run_id)
            return _train_claimed(run, layout, run_dir)
    except OSError as err:  # the claim itself could not be written: a full disk, a folder refusing writes
        failure = write_failure(err, run_dir)
        if failure is None:
            raise
        error = error_text(failure)
        unrecorded = record_failure(run, layout, datetime.now(timezone.utc), error)
        raise TrainingFailed(f"run {run.run_id}: {error}" + (f" ({unrecorded})" if unrecorded else "")) from err


def _train_claimed(run: TrainingRunSpec, layout: SweepLayout, run_dir: Path) -> TrainingResult:
    """Train in the child while holding the claim: no other trainer of this run is at work, so partial
    checkpoint folders here were left by a killed one. The run's row is replaced, never deleted, so a
    catalog reader never finds its file missing."""
    started = datetime.now(timezone.utc)
    remove_partial_checkpoints(run_dir / "checkpoints")
    try:
        spec_file = run_dir / "run.json"
        write_atomic(spec_file, run.model_dump_json(indent=2).encode())
        write_run_row(run, layout, started, status="running", error=None, stats={})
        code, reported = _run_child(spec_file)
    except OSError as err:  # the run folder or tables refused before training: the child never ran
        code, reported = None, error_text(write_failure(err, run_dir) or err)
    if code == 0:
        return completed(run, layout)
    error = recorded_error(layout, run, since=started)
    if error is None:  # the child could not record it, or was killed before it could
        error = reported or _exit_reason(code)
        unrecorded = record_failure(run, layout, started, error)
        error += f" ({unrecorded})" if unrecorded else ""
    raise TrainingFailed(f"run {run.run_id}: {error}")


def _run_child(spec_file: Path) -> tuple[int, str | None]:
    """`python -m tasks.train.run spec_file`: its exit status and the error it reported (tasks.train.records)."""
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cpu_threads_per_task()),
           ERROR_FD_ENV: str(write_fd)}
    try:
        code = subprocess.run([sys.executable, "-m", "tasks.train.run", str(spec_file)], env=env,
                              pass_fds=(write_fd,), preexec_fn=_die_with_parent).returncode
    finally:
        os.close(write_fd)
    try:
        return code, read_reported(read_fd)
    finally:
        os.close(read_fd)


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the flow process dies, so no orphan keeps training."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG



def _exit_reason(code: int | None) -> str:
    if code is None:
        return "training process did not start"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"training process was killed by {name}{hint}"
    return f"training process exited with status {code}"
