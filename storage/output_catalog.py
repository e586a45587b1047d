"""The output folder's catalog: `<output_dir>/catalog.duckdb`, every sweep ever run there in one place.

Views over every sweep record's Parquet files (storage.history), each row carrying `sweep_id`,
`sweep_name` and `sweep_started_at` of the sweep that listed it (a run two sweeps share appears once
per sweep), and a `sweeps` table with one row per sweep id. Like the sweep catalog it only reads
Parquet, is rebuilt under a temporary name and swapped in under a lock, and is written in a storage
version older DuckDB clients read.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

import duckdb

from storage.catalog import WRITE_CONFIG, Manifest, table_sql
from storage.history import SweepRecord, all_records
from storage.layout import SweepLayout
from storage.schema import SCHEMA_VERSION, TABLES

CATALOG_NAME = "catalog.duckdb"
TEMP_PREFIX = ".catalog."
SWEEPS_COLUMNS = ("sweep_id VARCHAR, sweep_name VARCHAR, started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, "
                  "status VARCHAR, runs INTEGER, render_jobs INTEGER, images INTEGER, sweep_root VARCHAR, "
                  "report VARCHAR, failures VARCHAR[], spec JSON")


def output_catalog_path(output_dir: Path) -> Path:
    return Path(output_dir) / CATALOG_NAME


def sweep_table_sql(record: SweepRecord, table: str) -> str:
    """The table's rows of one sweep, labelled with that sweep."""
    sweep_id, name, started = (_quote(x) for x in (record.sweep_id, record.name, record.started_at))
    rows = table_sql(SweepLayout(Path(record.root)), record.manifest, table)
    return (f"SELECT * REPLACE ('{sweep_id}' AS sweep_id), '{name}' AS sweep_name, "
            f"TIMESTAMPTZ '{started}' AS sweep_started_at FROM ({rows})")


def build_output_catalog(output_dir: Path) -> Path:
    """(Re)build `<output_dir>/catalog.duckdb` from every sweep record there; swapped in atomically."""
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "catalog.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in output_dir.glob(f"{TEMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)  # a killed builder's; no other builder runs under the lock
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".duckdb", dir=output_dir)
        os.close(fd)
        os.unlink(tmp)
        try:
            _build(tmp, all_records(output_dir))
            os.replace(tmp, output_catalog_path(output_dir))
        finally:
            Path(tmp).unlink(missing_ok=True)
            Path(tmp + ".wal").unlink(missing_ok=True)
    return output_catalog_path(output_dir)


def _build(path: str, records: list[SweepRecord]) -> None:
    con = duckdb.connect(path, config=WRITE_CONFIG)
    try:
        con.execute(f"CREATE TABLE sweeps ({SWEEPS_COLUMNS})")
        for r in records:
            con.execute("INSERT INTO sweeps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [r.sweep_id, r.name, r.started_at, r.finished_at, r.status, len(r.run_ids),
                         len(r.render_ids), r.images, r.root, r.report and str(Path(r.root) / r.report),
                         list(r.failures), json.dumps(r.spec)])
        con.execute("CREATE TABLE catalog_info AS SELECT ?::INTEGER AS schema_version, ?::INTEGER AS sweeps",
                    [SCHEMA_VERSION, len(records)])
        nothing = Manifest("", (), ())
        for table in TABLES:
            # typed even with no sweeps: the table's columns from an empty relation, plus the sweep labels
            empty = (f"SELECT *, NULL::VARCHAR AS sweep_name, NULL::TIMESTAMPTZ AS sweep_started_at "
                     f"FROM ({table_sql(SweepLayout(Path(path).parent), nothing, table)})")
            body = " UNION ALL BY NAME ".join([*(sweep_table_sql(r, table) for r in records), empty])
            con.execute(f"CREATE VIEW {table} AS {body}")
    finally:
        con.close()


def _quote(text: str) -> str:
    return str(text).replace("'", "''")


def connect_output_catalog(output_dir: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to the output folder's catalog."""
    return duckdb.connect(str(output_catalog_path(output_dir)), read_only=True)
