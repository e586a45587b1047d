"""Atomic Parquet writes: a reader (DuckDB, the report) never sees a partial file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import atomic_file
from storage.schema import SCHEMA_VERSION, TABLES


def rows_to_table(table: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build an Arrow table for `table` from dict rows; unknown or missing columns are errors."""
    schema = TABLES[table]
    names = set(schema.names)
    for i, row in enumerate(rows):
        extra, missing = set(row) - names, names - set(row)
        if extra or missing:
            raise ValueError(
                f"{table} row {i}: unknown columns {sorted(extra)}, missing columns {sorted(missing)}"
            )
    columns = {name: [row[name] for row in rows] for name in schema.names}
    meta = {b"lora_sweep.table": table.encode(), b"lora_sweep.schema_version": str(SCHEMA_VERSION).encode()}
    return pa.table(columns, schema=schema.with_metadata(meta))


def write_rows(table: str, rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Validate rows against the table schema and write them to `path` atomically."""
    return write_table_atomic(rows_to_table(table, rows), path)


def write_table_atomic(data: pa.Table, path: Path) -> Path:
    """Write through storage.atomic.atomic_file, fsynced before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, fsync=True) as handle:
        pq.write_table(data, handle)
    return path
