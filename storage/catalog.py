"""The DuckDB catalog: a small .duckdb file of views over one sweep's Parquet files.

Tasks write Parquet; the catalog only reads. Views name the exact files of the current sweep
(from its manifest), with absolute paths so any working directory can open it. The file is
rebuilt under a temporary name and swapped in, so a reader never blocks a writer.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from storage.atomic import write_atomic
from storage.compaction import bounded_files, remove_unused_compacted
from storage.layout import SweepLayout
from storage.schema import SCHEMA_VERSION, TABLES

VIEWS_DIR = Path(__file__).parent / "views"
# Derived views, created in this order after the base tables.
DERIVED_VIEWS = ("grid", "run_summary", "best_by_metric", "ladder_outcome")
# Written in the oldest storage format that holds views, so DuckDB clients older than the library that
# wrote it open it too (the CLI on the package index, DBeaver's driver); `duckdb` in the project's venv
# is that CLI (docs: README, "Query the results").
STORAGE_VERSION = "v1.0.0"
WRITE_CONFIG = {"storage_compatibility_version": STORAGE_VERSION}
CATALOG_TEMP_PREFIX = ".catalog."  # a catalog being built; removed under the builders' lock when left behind


@dataclass(frozen=True)
class Manifest:
    """Which artifacts belong to the current sweep: the keys of its Parquet files per table."""

    sweep_id: str
    run_ids: tuple[str, ...]
    render_ids: tuple[str, ...]
    zero_weight_in_grid: bool = True  # the spec lists LoRA weight 0.0, so baselines join the grid
    # Runs and render jobs another sweep folder already holds (used there, never made twice): key -> that folder.
    run_roots: dict[str, str] = field(default_factory=dict)
    render_roots: dict[str, str] = field(default_factory=dict)

    def keys(self, table: str) -> tuple[str, ...]:
        if table == "ladder":  # one file per sweep, written by the flow (flows/halving.py)
            return (self.sweep_id,)
        return self.render_ids if table in ("images", "image_metrics", "renders") else self.run_ids

    def layout_of(self, table: str, key: str, own: SweepLayout) -> SweepLayout:
        """The sweep folder holding the table's rows for `key` (`renders` and `ladder` are always the sweep's own)."""
        roots = {} if table in ("renders", "ladder") else self.render_roots if table in ("images", "image_metrics") \
            else self.run_roots
        return SweepLayout(Path(roots[key])) if key in roots else own

    def write(self, layout: SweepLayout) -> Path:
        path = layout.root / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"sweep_id": self.sweep_id, "run_ids": self.run_ids, "render_ids": self.render_ids,
                   "zero_weight_in_grid": self.zero_weight_in_grid, "schema_version": SCHEMA_VERSION,
                   "run_roots": self.run_roots, "render_roots": self.render_roots}
        return write_atomic(path, json.dumps(payload, indent=2).encode())

    @classmethod
    def read(cls, layout: SweepLayout) -> Manifest:
        data = json.loads((layout.root / "manifest.json").read_text())
        return cls(data["sweep_id"], tuple(data["run_ids"]), tuple(data["render_ids"]),
                   bool(data.get("zero_weight_in_grid", True)), dict(data.get("run_roots", {})),
                   dict(data.get("render_roots", {})))


def table_files(layout: SweepLayout, manifest: Manifest, table: str, compact: bool = False) -> list[str]:
    """Absolute paths of the table's Parquet files that exist (a failed task may have none); a run row
    written to its fallback place (SweepLayout.row_file) counts. Complete chunks of keys read as one
    compacted file each (storage.compaction; written here when `compact`, which only the builder holding
    the sweep's catalog lock passes). A source file is only ever replaced atomically, never deleted, and
    a compacted file outlives the catalogs naming it, so a view never names a file that vanishes."""
    files = [manifest.layout_of(table, key, layout).row_file(table, key) for key in manifest.keys(table)]
    return [str(f.resolve()) for f in bounded_files(layout, table, files, compact)]


def table_sql(layout: SweepLayout, manifest: Manifest, table: str, compact: bool = False) -> str:
    """A SELECT over the table's files, or a typed empty relation when there are none."""
    return files_sql(table, table_files(layout, manifest, table, compact))


def files_sql(table: str, files: list[str]) -> str:
    """A SELECT over these files of the table, typed by its schema."""
    columns = ", ".join(f"CAST(NULL AS {_duckdb_type(f.type)}) AS {f.name}" for f in TABLES[table])
    if files:
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        # BY NAME with the typed empty relation: a column added after older files were written reads as NULL.
        return (f"SELECT * FROM read_parquet([{listed}], union_by_name = true) "
                f"UNION ALL BY NAME SELECT {columns} WHERE false")
    return f"SELECT {columns} WHERE false"


def _duckdb_type(t: pa.DataType) -> str:
    if pa.types.is_string(t):
        return "VARCHAR"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t):
        return f"{_duckdb_type(t.value_type)}[]"
    raise TypeError(f"no DuckDB type for {t}")


def build_catalog(layout: SweepLayout, manifest: Manifest | None = None) -> Path:
    """(Re)build `catalog.duckdb` with one view per table plus the derived views; swap it in atomically.

    Builders take a file lock, so the catalog swapped in last always lists the newest files, and a
    half-built catalog found under the lock was left by a killed builder and is removed; readers never
    take it.
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.root / "catalog.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_and_swap(layout, manifest or Manifest.read(layout))


def remove_catalog_leftovers(layout: SweepLayout) -> list[Path]:
    """Remove catalogs half-built by killed builders; call only while holding the builders' lock, when no
    other builder can be at work."""
    leftovers = [p for suffix in (".duckdb", ".duckdb.wal") for p in layout.root.glob(f"{CATALOG_TEMP_PREFIX}*{suffix}")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


def _build_and_swap(layout: SweepLayout, manifest: Manifest) -> Path:
    remove_catalog_leftovers(layout)
    fd, tmp = tempfile.mkstemp(prefix=CATALOG_TEMP_PREFIX, suffix=".duckdb", dir=layout.root)
    os.close(fd)
    os.unlink(tmp)  # DuckDB must create the file itself
    try:
        con = duckdb.connect(tmp, config=WRITE_CONFIG)
        try:
            con.execute("CREATE TABLE catalog_info AS SELECT ?::VARCHAR AS sweep_id, ?::INTEGER AS schema_version, "
                        "?::BOOLEAN AS zero_weight_in_grid", [manifest.sweep_id, SCHEMA_VERSION,
                                                            manifest.zero_weight_in_grid])
            used: dict[str, set[Path]] = {}
            for table in TABLES:
                files = table_files(layout, manifest, table, compact=True)
                con.execute(f"CREATE VIEW {table} AS {files_sql(table, files)}")
                used[table] = {Path(f) for f in files}
            for view in DERIVED_VIEWS:
                con.execute(f"CREATE VIEW {view} AS {(VIEWS_DIR / f'{view}.sql').read_text()}")
        finally:
            con.close()
        os.replace(tmp, layout.catalog_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp + ".wal").unlink(missing_ok=True)
    for table, files in used.items():
        remove_unused_compacted(layout, table, files)
    return layout.catalog_path


def connect(layout: SweepLayout) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the sweep's catalog: many readers, never a lock on writers."""
    return duckdb.connect(str(layout.catalog_path), read_only=True)
