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

from storage.layout import SweepLayout
from tasks.sweep.devices import cpu_threads_per_task
from tasks.sweep.plan import TrainingRunSpec
from tasks.train.claim import claim_run, record_trainer
from tasks.train.records import TrainingResult, already_done, completed, recorded_error, write_run_row


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
    with claim_run(run_dir):
        if already_done(run, layout):  # finished by the claim's previous holder
            return completed(run, layout)
        record_trainer(run_dir, run.run_id)
        return _train_claimed(run, layout, run_dir)


def _train_claimed(run: TrainingRunSpec, layout: SweepLayout, run_dir: Path) -> TrainingResult:
    spec_file = run_dir / "run.json"
    spec_file.write_text(run.model_dump_json(indent=2))
    layout.table_file("runs", run.run_id).unlink(missing_ok=True)  # a failed earlier attempt's row
    started = datetime.now(timezone.utc)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(cpu_threads_per_task())}
    code = subprocess.run([sys.executable, "-m", "tasks.train.run", str(spec_file)], env=env,
                          preexec_fn=_die_with_parent).returncode
    if code == 0:
        return completed(run, layout)
    error = recorded_error(layout, run)
    if error is None:  # killed before it could record anything
        error = _exit_reason(code)
        write_run_row(run, layout, started, status="failed", error=error, stats={})
    raise TrainingFailed(f"run {run.run_id}: {error}")


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when the flow process dies, so no orphan keeps training."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG



def _exit_reason(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
        return f"training process was killed by {name}{hint}"
    return f"training process exited with status {code}"
