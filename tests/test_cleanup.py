"""Leftovers of killed writers: every writer's temporary name is recognised and removed by the next run,
and a live writer's temporary file is never touched (storage.cleanup, docs/faults.md)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from storage.atomic import HOST, atomic_file
from storage.catalog import Manifest, build_catalog
from storage.cleanup import FRESH_S, is_stale_temp_file, remove_stale_temp_files
from storage.layout import SweepLayout
from tasks.lora.files import partial_prefix
from tasks.preflight import prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import training_runs
from tasks.train.child_process import train_in_subprocess
from tests.conftest import small_sweep_data
from tests.fault_injection import kill_mid_write, train_in_this_process

# A writer of each kind, killed while its temporary file is open: tables, PNG and grid, report, manifest,
# the demo world's builtin files and the encoding cache.
WRITERS = """
import contextlib, sys, time
from pathlib import Path
from storage.atomic import atomic_file
out = Path(sys.argv[1])
paths = [out / "small/tables/runs/r.parquet", out / "small/images/job/img.png", out / "small/images/job/grid-ab.png",
         out / "small/report/report.js", out / "small/report/index.html", out / "small/manifest.json",
         out / "builtin/demo-world-zqx-64/0.png", out / "cache/latents/ab/abcd.safetensors"]
with contextlib.ExitStack() as stack:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        stack.enter_context(atomic_file(path)).write(b"partial")
    print("ready", flush=True)
    time.sleep(600)
"""

# The catalog builder, killed after DuckDB created its temporary file.
CATALOG_BUILDER = """
import sys, time
from pathlib import Path
import storage.catalog as catalog
from storage.layout import SweepLayout
real = catalog.duckdb.connect
def stall(path, *args, **kwargs):
    con = real(path, *args, **kwargs)
    con.execute("CREATE TABLE t AS SELECT 1")
    print("ready", flush=True)
    time.sleep(600)
catalog.duckdb.connect = stall
catalog.build_catalog(SweepLayout(Path(sys.argv[1])), catalog.Manifest("s", (), ()))
"""


def hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*"))


def test_every_writer_killed_mid_write_leaves_nothing_after_the_next_run(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    spec = parse_spec(small_sweep_data(out, ranks=[2], max_steps=2, checkpoint_steps=[2], cache="disk"))
    inputs = prepare_inputs(spec)
    [run] = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    layout = SweepLayout(out / "small")
    kill_mid_write(WRITERS, str(out))
    kill_mid_write(CATALOG_BUILDER, str(layout.root))
    checkpoints = layout.run_dir(run.run_id) / "checkpoints"
    checkpoints.mkdir(parents=True)
    partial = Path(tempfile.mkdtemp(prefix=partial_prefix(layout.checkpoint_dir(run.run_id, 2)), dir=checkpoints))
    (partial / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (partial / "training_state.pt").write_bytes(b"")  # what a kill inside torch.save leaves
    left = hidden(out)
    assert len([p for p in left if p.suffix == ".tmp"]) == 8
    assert any(p.name.startswith(".catalog.") for p in left) and partial in left

    # The next run: its preflight, its trainer (under the run's claim) and its catalog builder.
    prepare_inputs(spec)
    train_in_this_process(monkeypatch, main=lambda argv: 0)  # the child's training is not the point here
    train_in_subprocess(run)
    build_catalog(layout, Manifest(spec.sweep_id(), (run.run_id,), ()))
    assert hidden(out) == []


def test_a_live_writers_temporary_file_is_kept_however_old(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    with atomic_file(target) as handle:
        handle.write(b"half")
        [tmp] = hidden(tmp_path)
        os.utime(tmp, (time.time() - 10 * FRESH_S,) * 2)
        assert not is_stale_temp_file(tmp)  # locked by this writer
        assert remove_stale_temp_files(tmp_path) == []
        handle.write(b" and the rest")
    assert target.read_bytes() == b"half and the rest"


def test_an_unlocked_temporary_file_goes_when_its_writer_is_gone_or_it_is_old(tmp_path: Path) -> None:
    dead_here = tmp_path / f".a.png.{HOST}.{2**22 + 12345}.abcdefgh.tmp"  # above the largest pid Linux allows
    alive_here = tmp_path / f".b.png.{HOST}.{os.getpid()}.abcdefgh.tmp"  # this process, not writing it
    elsewhere = tmp_path / ".c.png.another-host.12.abcdefgh.tmp"
    unnamed = tmp_path / ".d.png.abcdefgh.tmp"  # written before temporary names recorded their writer
    not_ours = tmp_path / ".e.png.tmp"
    for path in (dead_here, alive_here, elsewhere, unnamed, not_ours):
        path.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead_here]
    for path in (alive_here, elsewhere, unnamed, not_ours):
        os.utime(path, (time.time() - FRESH_S - 1,) * 2)
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([alive_here, elsewhere, unnamed])
    assert not_ours.exists()
