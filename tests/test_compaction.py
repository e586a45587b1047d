"""Catalog views read a bounded number of files: complete chunks of keys are compacted, never stale."""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb
import pytest

from storage import compaction
from storage.catalog import Manifest, build_catalog, connect, table_files
from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tests.test_catalog import image_rows


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compaction, "CHUNK_KEYS", 4)


def sweep(tmp_path: Path, keys: int, written: int | None = None) -> tuple[SweepLayout, Manifest]:
    layout = SweepLayout(tmp_path / "sweep")
    ids = tuple(f"r{i:03d}" for i in range(keys))
    for render_id in ids[: keys if written is None else written]:
        write_rows("images", image_rows(render_id), layout.table_file("images", render_id))
    return layout, Manifest("sweep", (), ids)


def rows(layout: SweepLayout) -> list[tuple]:
    with connect(layout) as con:
        return con.execute("SELECT image_id, render_id, prompt FROM images ORDER BY image_id").fetchall()


def test_complete_chunks_are_read_as_one_file_each_with_the_same_rows(tmp_path: Path) -> None:
    layout, manifest = sweep(tmp_path, keys=10)
    before = sorted((f"{k}-{i}", k, "p") for k in manifest.render_ids for i in range(3))
    build_catalog(layout, manifest)
    files = table_files(layout, manifest, "images")
    assert len(files) == 2 + 2  # two complete chunks of 4 compacted, the last 2 keys as they are
    assert sum("/compacted/" in f for f in files) == 2
    assert rows(layout) == before


def test_an_incomplete_chunk_is_read_file_by_file(tmp_path: Path) -> None:
    layout, manifest = sweep(tmp_path, keys=8, written=7)
    build_catalog(layout, manifest)
    files = table_files(layout, manifest, "images")
    assert len(files) == 1 + 3 and sum("/compacted/" in f for f in files) == 1
    assert len(rows(layout)) == 7 * 3


def test_a_replaced_source_file_is_never_read_through_a_stale_compacted_file(tmp_path: Path) -> None:
    layout, manifest = sweep(tmp_path, keys=4)
    build_catalog(layout, manifest)
    changed = [{**row, "prompt": "new"} for row in image_rows("r001")]
    time.sleep(0.01)
    write_rows("images", changed, layout.table_file("images", "r001"))
    build_catalog(layout, manifest)
    assert {r[2] for r in rows(layout) if r[1] == "r001"} == {"new"}
    assert len(list((layout.table_dir("images") / "compacted").glob("*.parquet"))) == 2  # the old one kept a while


def test_unused_compacted_files_go_after_the_grace_period(tmp_path: Path) -> None:
    layout, manifest = sweep(tmp_path, keys=4)
    build_catalog(layout, manifest)
    old = next((layout.table_dir("images") / "compacted").glob("*.parquet"))
    write_rows("images", image_rows("r002"), layout.table_file("images", "r002"))
    stale = time.time() - compaction.GRACE_S - 10
    os.utime(old, (stale, stale))
    build_catalog(layout, manifest)
    assert not old.exists()
    assert len(rows(layout)) == 4 * 3


def test_old_duckdb_clients_read_the_storage_version(tmp_path: Path) -> None:
    layout, manifest = sweep(tmp_path, keys=2)
    build_catalog(layout, manifest)
    header = layout.catalog_path.read_bytes()[:64]
    assert header[8:12] == b"DUCK" and header[12] == 64  # storage version 64: DuckDB 1.0 and later read it
    with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 6
