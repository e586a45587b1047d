"""Faults recorded as data (docs/faults.md): catalog readers never see an error while a run is retried,
a full disk or a folder refusing writes ends in a failed runs row naming the folder wherever one still
fits, a run resumed at its last checkpoint records no speed rather than NaN, and the flow ends FAILED
with the folder's name when its own files cannot be written."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import threading
import time
from collections import namedtuple
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from safetensors import SafetensorError

from reports.build_report import build_report
from storage.catalog import Manifest, build_catalog
from storage.disk import WriteFailed
from storage.layout import SweepLayout
from tasks.lora import export
from tasks.preflight import prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.child_process import TrainingFailed, train_in_subprocess
from tasks.train.records import read_reported, report_to_parent, write_run_row
from tasks.train.run import main as run_main
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data, write_spec
from tests.fault_injection import refuse_writes, train_in_this_process

DiskUsage = namedtuple("DiskUsage", "total used free")


def tiny_run(out: Path) -> tuple[TrainingRunSpec, SweepLayout]:
    spec = parse_spec(small_sweep_data(out, ranks=[2], max_steps=2, checkpoint_steps=[1, 2]))
    inputs = prepare_inputs(spec)
    [run] = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    return run, SweepLayout(out / "small")


def runs_rows(layout: SweepLayout, run: TrainingRunSpec) -> list[dict]:
    build_catalog(layout, Manifest(run.sweep_id, (run.run_id,), ()))
    with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
        cursor = con.execute("SELECT status, error, steps_per_s FROM runs")
        return [dict(zip(("status", "error", "steps_per_s"), row)) for row in cursor.fetchall()]


def test_catalog_readers_see_no_error_while_a_failed_run_is_retried(tmp_path: Path, monkeypatch) -> None:
    run, layout = tiny_run(tmp_path / "out")
    write_run_row(run, layout, datetime.now(timezone.utc), status="failed", error="the earlier attempt's error",
                  stats={})
    build_catalog(layout, Manifest(run.sweep_id, (run.run_id,), ()))
    errors, polls, stop = [], [0], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
                    con.execute("SELECT count(*) FROM runs").fetchone()
            except duckdb.Error as err:
                errors.append(str(err))
            polls[0] += 1

    def killed_child(argv: list[str]) -> int:  # the retry's child dies without a word, as under kill -9
        time.sleep(1.0)
        return -9

    train_in_this_process(monkeypatch, killed_child)
    reader = threading.Thread(target=poll)
    reader.start()
    try:
        with pytest.raises(TrainingFailed) as info:
            train_in_subprocess(run)
    finally:
        stop.set()
        reader.join()
    assert polls[0] > 10 and errors == []
    assert "killed by SIGKILL" in str(info.value) and "earlier attempt" not in str(info.value)
    assert [r["error"] for r in runs_rows(layout, run)] == ["training process was killed by SIGKILL "
                                                            "(the system may have run out of memory)"]


def test_the_childs_reported_error_is_recorded_when_it_could_write_nothing(tmp_path: Path, monkeypatch) -> None:
    run, layout = tiny_run(tmp_path / "out")

    def child(argv: list[str]) -> int:
        report_to_parent("WriteFailed: [Errno 28] no space left on the disk holding '/somewhere'")
        return 1

    train_in_this_process(monkeypatch, child)
    with pytest.raises(TrainingFailed, match="no space left on the disk holding '/somewhere'"):
        train_in_subprocess(run)
    assert runs_rows(layout, run)[0]["error"].startswith("WriteFailed: [Errno 28] no space left")


def test_a_report_longer_than_the_pipe_never_blocks_the_child(monkeypatch) -> None:
    read_fd, write_fd = os.pipe()
    monkeypatch.setenv("LORA_SWEEP_ERROR_FD", str(write_fd))
    report_to_parent("x" * 10**6)
    os.close(write_fd)
    assert read_reported(read_fd) == "x" * 8192
    os.close(read_fd)


def full_disk_in_safetensors(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def full_disk_in_torch_save(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("writer", ["safetensors", "torch.save"])
def test_a_full_disk_while_saving_a_checkpoint_is_a_failed_run_naming_the_disk(tmp_path: Path, monkeypatch,
                                                                                writer: str) -> None:
    run, layout = tiny_run(tmp_path / "out")
    if writer == "safetensors":
        monkeypatch.setattr(export, "save_file", full_disk_in_safetensors)
    else:  # torch.save hides the errno: the disk's free space names the cause
        monkeypatch.setattr(export.torch, "save", full_disk_in_torch_save)
        monkeypatch.setattr("storage.disk.shutil.disk_usage", lambda path: DiskUsage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(WriteFailed):
        train_lora(run)
    [row] = runs_rows(layout, run)
    checkpoints = layout.run_dir(run.run_id) / "checkpoints"
    assert row["status"] == "failed"
    assert f"no space left on the disk holding '{checkpoints}'" in row["error"]
    assert list(checkpoints.iterdir()) == []  # the partial checkpoint folder is gone


def test_a_tables_folder_refusing_writes_keeps_the_failed_row_beside_the_run(tmp_path: Path, monkeypatch) -> None:
    run, layout = tiny_run(tmp_path / "out")
    refuse_writes(monkeypatch, layout.tables_dir, errno.EACCES)
    with pytest.raises(WriteFailed):
        train_lora(run)
    assert not list(layout.tables_dir.rglob("*.parquet"))
    [row] = runs_rows(layout, run)  # read from runs/<run_id>/runs-row.parquet
    assert row["status"] == "failed"
    assert f"writing to '{layout.tables_dir / 'losses'}' was refused: Permission denied" in row["error"]

    monkeypatch.undo()  # the folder takes writes again: the re-run resumes at the last checkpoint
    assert train_lora(run).status == "completed"
    [row] = runs_rows(layout, run)
    assert row["status"] == "completed" and row["steps_per_s"] is None


def test_when_no_row_fits_anywhere_the_failure_names_the_disk(tmp_path: Path, monkeypatch) -> None:
    run, layout = tiny_run(tmp_path / "out")

    def child(argv: list[str]) -> int:  # the disk fills once the child has started
        monkeypatch.setattr(export, "save_file", full_disk_in_safetensors)
        refuse_writes(monkeypatch, layout.root, errno.ENOSPC)
        return run_main(argv)

    train_in_this_process(monkeypatch, child)
    with pytest.raises(TrainingFailed) as info:
        train_in_subprocess(run)
    message = str(info.value)
    assert f"no space left on the disk holding '{layout.run_dir(run.run_id) / 'checkpoints'}'" in message
    assert "its failed runs row could not be written anywhere" in message


def test_a_run_resumed_at_its_last_checkpoint_records_no_speed(tmp_path: Path) -> None:
    run, layout = tiny_run(tmp_path / "out")
    train_lora(run)
    layout.table_file("runs", run.run_id).unlink()  # killed after the last checkpoint, before its row
    train_lora(run)
    assert pq.read_table(layout.table_file("runs", run.run_id)).column("steps_per_s").to_pylist() == [None]
    assert runs_rows(layout, run)[0]["steps_per_s"] is None
    html = build_report(layout.root).read_text()
    assert "NaN" not in html and "completed" in html


@pytest.mark.slow  # a whole flow run, then its re-run (~40 s): the fast suite passed its 10-minute budget
def test_a_sweep_whose_files_the_disk_refuses_ends_failed_naming_the_folder(prefect_harness, tmp_path: Path,
                                                                            monkeypatch) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out", ranks=[2], max_steps=2, checkpoint_steps=[2])
    data["render"].update(steps=[2], samplers=["Euler a"], seeds=[1])
    spec_path = str(write_spec(tmp_path, data))
    root = tmp_path / "out" / "small"
    train_in_this_process(monkeypatch)  # training in this process, so the refusal reaches it

    with monkeypatch.context() as refusing:  # 1. tables/ refuses writes: the failure is in the catalog and report
        refuse_writes(refusing, root / "tables", errno.EACCES)
        state = lora_sweep(spec_path=spec_path, return_state=True)
    assert state.is_failed() and f"writing to '{root / 'tables'}" in state.message
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        [(status, error)] = con.execute("SELECT status, error FROM runs").fetchall()
    assert status == "failed" and "was refused" in error
    report = (root / "report" / "index.html").read_text()
    assert "was refused" in report and "No failed runs" not in report

    with monkeypatch.context() as full:  # 2. the disk fills before the manifest: FAILED, naming it
        refuse_writes(full, root, errno.ENOSPC, only=".manifest.json.")
        state = lora_sweep(spec_path=spec_path, return_state=True)
    assert state.is_failed()
    assert f"manifest {root / 'manifest.json'}: [Errno 28] no space left on the disk holding '{root}'" in state.message

    state = lora_sweep(spec_path=spec_path, return_state=True)  # 3. room again: everything completes
    assert state.is_completed(), state.message
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT status, steps_per_s FROM runs").fetchall() == [("completed", None)]


def test_every_test_the_faults_doc_names_exists() -> None:
    repo = Path(__file__).resolve().parent.parent
    named = set(re.findall(r"`(test_\w+)`", (repo / "docs" / "faults.md").read_text()))
    defined = {name for path in (repo / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE)}
    assert len(named) >= 10 and named - defined == set()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_folders_follow_the_users_umask(tmp_path: Path, umask: int) -> None:
    """Atomic writes (tables, PNGs, report) and checkpoint folders get the modes the umask gives a
    plain open() and mkdir(): 0644/0755 under 022, 0664/0775 under a group-shared 002."""
    script = (
        "import os, sys, pathlib\n"
        f"os.umask({umask})\n"
        "from storage.atomic import FOLDER_MODE, write_atomic\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "write_atomic(out / 'table.parquet', b'x')\n"
        "print(oct(FOLDER_MODE))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent)
    assert oct((tmp_path / "table.parquet").stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert result.stdout.strip() == oct(0o777 & ~umask)
