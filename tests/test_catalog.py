"""The DuckDB catalog under concurrent writers and readers, with missing files, from any directory."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import types
from pathlib import Path

import duckdb
import pytest

from storage import catalog
from storage.catalog import Manifest, build_catalog, connect
from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from storage.schema import IMAGES

WRITERS = 2
WRITE_SECONDS = 3.0
ROWS_PER_FILE = 3
MAX_FILES = 200  # per writer; the manifest lists them all, build_catalog keeps those that exist
COUNT_SQL = "SELECT split_part(render_id, '-', 1) AS writer, count(*) FROM images GROUP BY writer"


def key(writer: int, index: int) -> str:
    """The render id of a writer's index-th Parquet file."""
    return f"w{writer}-{index:05d}"


def manifest(writers: int = WRITERS, files: int = MAX_FILES) -> Manifest:
    """One manifest naming every file any writer may produce, as a sweep's manifest names every render."""
    keys = tuple(key(w, i) for w in range(writers) for i in range(files))
    return Manifest("sweep", run_ids=(), render_ids=keys)


def image_rows(render_id: str) -> list[dict[str, object]]:
    """ROWS_PER_FILE valid `images` rows for one render job."""
    values = {"sweep_id": "sweep", "render_id": render_id, "base_model": "tiny", "run_id": None,
              "checkpoint_id": None, "rank": None, "checkpoint_step": None, "sampler": "Euler", "steps": 10,
              "lora_weight": 0.0, "cfg_scale": 7.0, "prompt_index": 0, "prompt": "p", "negative_prompt": "",
              "seed": 0, "width": 64, "height": 64, "path": "/x.png", "render_s": 0.1, "extra_loras": None,
              "precision": "fp32", "prompt_syntax": "a1111", "prompt_tokens": 1, "clip_skip": 1,
              "prompt_source": "spec", "source_image": None, "held_out": None}
    assert set(values) | {"image_id"} == set(IMAGES.names)
    return [{**values, "image_id": f"{render_id}-{i}"} for i in range(ROWS_PER_FILE)]


def write_render(layout: SweepLayout, render_id: str) -> None:
    """Write one render job's images file atomically, as a render task does."""
    write_rows("images", image_rows(render_id), layout.table_file("images", render_id))


def writer_process(root: str, writer: int, published, errors) -> None:
    """Write new files and rebuild the catalog until WRITE_SECONDS pass; publish each finished build."""
    layout, full = SweepLayout(Path(root)), manifest()
    deadline = time.monotonic() + WRITE_SECONDS
    index = 0
    try:
        while time.monotonic() < deadline and index < MAX_FILES:
            write_render(layout, key(writer, index))
            build_catalog(layout, full)
            index += 1
            published[writer] = index  # this build, with all `index` files, is now swapped in
    except BaseException as error:  # reported to the test, which fails on any
        errors.put(f"writer {writer}: {type(error).__name__}: {error}")


def read_counts(layout: SweepLayout) -> dict[str, int]:
    """Rows per writer in the current catalog, through a fresh read-only connection."""
    with connect(layout) as con:
        return dict(con.execute(COUNT_SQL).fetchall())


def reader_loop(layout: SweepLayout, published, procs: list) -> tuple[int, list[str], list[str]]:
    """Read until the writers exit; return the number of reads, every error and every stale read."""
    reads, problems, stale, last_total = 0, [], [], 0
    while any(p.is_alive() for p in procs):
        floor = list(published)
        if not layout.catalog_path.exists():
            continue
        try:
            counts = read_counts(layout)
        except Exception as error:
            problems.append(f"read {reads}: {type(error).__name__}: {error}")
            continue
        reads += 1
        total = sum(counts.values())
        if any(n % ROWS_PER_FILE for n in counts.values()):
            problems.append(f"read {reads}: partial file in {counts}")
        for writer in range(WRITERS):
            if counts.get(f"w{writer}", 0) < floor[writer] * ROWS_PER_FILE:
                stale.append(f"read {reads}: writer {writer} published {floor[writer]} files, catalog "
                                f"shows {counts.get(f'w{writer}', 0) // ROWS_PER_FILE}")
        if total < last_total:
            stale.append(f"read {reads}: row count fell from {last_total} to {total}")
        last_total = total
    return reads, problems, stale


def test_two_writers_and_a_reader_never_corrupt_or_lock_the_catalog(tmp_path: Path) -> None:
    """Readers never fail, never see a partial file, and never see a catalog older than one already published."""
    ctx = mp.get_context("spawn")
    published, errors = ctx.Array("i", WRITERS), ctx.Queue()
    layout = SweepLayout(tmp_path / "sweep")
    layout.root.mkdir(parents=True)
    procs = [ctx.Process(target=writer_process, args=(str(layout.root), w, published, errors))
             for w in range(WRITERS)]
    for p in procs:
        p.start()
    try:
        reads, problems, stale = reader_loop(layout, published, procs)
    finally:
        for p in procs:
            p.join(timeout=30)
    writer_errors = [errors.get() for _ in range(errors.qsize())]
    assert [p.exitcode for p in procs] == [0] * WRITERS and not writer_errors, writer_errors
    assert not problems, "\n".join(problems[:20])
    assert reads >= 5 and all(n >= 2 for n in published)
    assert not stale, "\n".join(stale[:20])
    final = read_counts(layout)
    assert final == {f"w{w}": published[w] * ROWS_PER_FILE for w in range(WRITERS)}
    assert not list(layout.root.glob(".catalog.*.duckdb*")), "temporary catalog files left behind"


def test_a_builder_that_listed_earlier_never_replaces_a_newer_catalog(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layout, full = SweepLayout(tmp_path / "sweep"), manifest(writers=1, files=2)
    write_render(layout, key(0, 0))
    real_replace, later = os.replace, threading.Thread(target=build_catalog, args=(layout, full))

    def replace_after_a_newer_build(src: str, dst: object) -> None:
        """Builder A listed 1 file; before it swaps in, file 2 lands and builder B runs."""
        if not later.is_alive() and later.ident is None:
            write_render(layout, key(0, 1))
            later.start()
            later.join(timeout=3)  # B waits on the builders' lock, so A's older catalog cannot land last
        real_replace(src, dst)

    monkeypatch.setattr(catalog, "os", types.SimpleNamespace(**{**vars(os), "replace": replace_after_a_newer_build}))
    build_catalog(layout, full)
    later.join(timeout=30)
    assert read_counts(layout) == {"w0": 2 * ROWS_PER_FILE}


def test_manifest_key_without_a_file_gives_the_typed_empty_view(tmp_path: Path) -> None:
    layout = SweepLayout(tmp_path / "sweep")
    build_catalog(layout, Manifest("sweep", run_ids=("run-never-written",), render_ids=("render-failed",)))
    with connect(layout) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        described = con.execute("DESCRIBE images").fetchall()
    assert [(name, kind) for name, kind, *_ in described] == [
        (f.name, catalog._duckdb_type(f.type)) for f in IMAGES]


def test_missing_file_is_skipped_and_present_ones_shown(tmp_path: Path) -> None:
    layout = SweepLayout(tmp_path / "sweep")
    write_render(layout, "present")
    build_catalog(layout, Manifest("sweep", run_ids=(), render_ids=("present", "absent")))
    with connect(layout) as con:
        assert con.execute("SELECT DISTINCT render_id FROM images").fetchall() == [("present",)]


def test_catalog_opens_read_only_from_another_working_directory(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sweep, elsewhere = tmp_path / "out" / "sweep", tmp_path / "elsewhere"
    elsewhere.mkdir(parents=True)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    layout = SweepLayout(Path("sweep"))  # relative, as a spec's output_dir often is
    write_render(layout, "r1")
    build_catalog(layout, Manifest("sweep", run_ids=(), render_ids=("r1",)))
    monkeypatch.chdir(elsewhere)
    with duckdb.connect(str(sweep / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone() == (ROWS_PER_FILE,)
        assert con.execute("SELECT count(*) FROM grid").fetchone()[0] >= 0


def test_images_written_before_the_extra_loras_column_read_it_as_null(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = SweepLayout(tmp_path / "sweep")
    write_render(layout, "new")
    later = ("extra_loras", "precision", "prompt_syntax", "prompt_tokens", "clip_skip", "prompt_source",
             "source_image", "held_out")  # an old file has none of these
    old_rows = [{k: v for k, v in row.items() if k not in later} for row in image_rows("old")]
    path = layout.table_file("images", "old")
    old_schema = pa.schema([field for field in IMAGES if field.name not in later])
    pq.write_table(pa.Table.from_pylist(old_rows, schema=old_schema), path)
    build_catalog(layout, Manifest("sweep", run_ids=(), render_ids=("old",)))
    with connect(layout) as con:  # only old files: the column still exists, all NULL
        assert con.execute("SELECT count(*), count(extra_loras), count(precision) FROM images").fetchone() == (
            ROWS_PER_FILE, 0, 0)
        assert con.execute("SELECT count(extra_loras) FROM grid").fetchone() == (0,)
    build_catalog(layout, Manifest("sweep", run_ids=(), render_ids=("old", "new")))
    with connect(layout) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone() == (2 * ROWS_PER_FILE,)


def test_runs_written_before_the_training_option_columns_still_read(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.schema import RUNS

    layout = SweepLayout(tmp_path / "sweep")
    old_columns = RUNS.names[:RUNS.get_field_index("run_dir") + 1]  # the runs schema before the options
    old = {"sweep_id": "sweep", "run_id": "old", "base_model": "tiny", "base_model_path": "/m", "rank": 4,
           "alpha": 4.0, "learning_rate": 1e-4, "max_steps": 10, "batch_size": 1, "resolution": 64, "seed": 0,
           "status": "completed", "error": None, "num_images": 3, "trainable_params": 100, "steps_per_s": 1.0,
           "peak_memory_mb": 1.0, "wall_time_s": 1.0, "started_at": None, "finished_at": None, "run_dir": "/r"}
    assert list(old) == old_columns
    layout.table_dir("runs").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old], schema=pa.schema([RUNS.field(n) for n in old_columns])),
                   layout.table_file("runs", "old"))
    new = {**old, "run_id": "new", "target_preset": None, "target_modules": ["to_q", "conv1"], "lora_dropout": 0.1,
           "lr_scheduler": "cosine", "lr_warmup_steps": 2, "lr_cycles": 1, "gradient_accumulation_steps": 2,
           "effective_batch_size": 2, "min_snr_gamma": 5.0, "noise_offset": 0.05, "mixed_precision": "bf16",
           "gradient_checkpointing": True, "optimizer": "adamw", "train_text_encoder": False,
           "text_encoder_lr": None, "validation_images": 1, "memory_preset_gib": 12.0, "buckets": True,
           "bucket_step": 64, "encoding_cache": "disk", "skipped_files": None, "max_grad_norm": None,
           "clip_skip": 1, "variant": None, "dataset_name": None, "class_prompt": None, "num_class_images": None,
           "prior_loss_weight": None, "network": "lora", "network_args": "{}"}
    write_rows("runs", [new], layout.table_file("runs", "new"))
    build_catalog(layout, Manifest("sweep", run_ids=("old",), render_ids=()))
    with connect(layout) as con:  # only the old file: every option column exists, NULL
        assert con.execute("SELECT run_id, lr_scheduler, target_modules, gradient_checkpointing FROM runs"
                           ).fetchall() == [("old", None, None, None)]
        assert con.execute("SELECT count(*) FROM run_summary").fetchone() == (1,)
    build_catalog(layout, Manifest("sweep", run_ids=("old", "new"), render_ids=()))
    with connect(layout) as con:
        assert con.execute("SELECT run_id, lr_scheduler, effective_batch_size, list_contains(target_modules, 'conv1') "
                           "FROM runs ORDER BY run_id").fetchall() == [("new", "cosine", 2, True),
                                                                      ("old", None, None, None)]
