"""Faults on demand for the fault tests: writes a folder refuses, a training child run in this process
(so monkeypatches reach it), and writers killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.train import child_process
from tasks.train.records import ERROR_FD_ENV

REPO = Path(__file__).resolve().parent.parent


def refuse_writes(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int, only: str | None = None) -> None:
    """Every atomic write (storage.atomic) under `folder`, or only those whose temporary name starts with
    `only`, fails with errno `code`, as a full disk (ENOSPC) or a read-only folder (EACCES) would. Tests
    run as root, which ignores permission bits, so chmod cannot do this."""
    real = tempfile.mkstemp

    def mkstemp(suffix=None, prefix=None, dir=None, text=False):
        if dir is not None and Path(dir).resolve().is_relative_to(folder.resolve()) and (
                only is None or (prefix or "").startswith(only)):
            raise OSError(code, os.strerror(code), str(dir))
        return real(suffix=suffix, prefix=prefix, dir=dir, text=text)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


class InProcessChild:
    """Stands in for `subprocess` in tasks.train.child_process: the training child's `main` runs in this
    process (with the error pipe in its environment), so a test's monkeypatches reach it."""

    def __init__(self, main: Callable[[list[str]], int] | None = None) -> None:
        from tasks.train.run import main as run_main

        self.main = main or run_main

    def run(self, args: list[str], *, env: dict[str, str], **_: object) -> SimpleNamespace:
        previous = os.environ.get(ERROR_FD_ENV)
        os.environ[ERROR_FD_ENV] = env[ERROR_FD_ENV]
        try:
            return SimpleNamespace(returncode=self.main([args[-1]]))
        finally:
            if previous is None:
                os.environ.pop(ERROR_FD_ENV, None)
            else:
                os.environ[ERROR_FD_ENV] = previous


def train_in_this_process(monkeypatch: pytest.MonkeyPatch, main: Callable[[list[str]], int] | None = None) -> None:
    monkeypatch.setattr(child_process, "subprocess", InProcessChild(main))


def kill_mid_write(script: str, *args: str) -> None:
    """Run `script` in a child process until it prints "ready", then SIGKILL it, as a crash would."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def assert_resumes_bit_identically(train, run, layout, step: int, losses: list[dict]) -> None:
    """Delete the run's last checkpoint (as a kill after the one before would leave it), train again, and
    require the same losses rows and bit-identical kohya tensors at `step`."""
    import shutil

    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    folder = layout.checkpoint_dir(run.run_id, step)
    final = load_file(folder / f"{run.run_id}-s{step}.safetensors")
    shutil.rmtree(folder)
    train(run)
    assert pq.read_table(layout.table_file("losses", run.run_id)).to_pylist() == losses
    resumed = load_file(folder / f"{run.run_id}-s{step}.safetensors")
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
