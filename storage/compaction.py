"""Keep the number of Parquet files a catalog view reads bounded, whatever the sweep's size.

Tasks write one small file per producing task (a run, a render job), and DuckDB pays about a
millisecond per file on every query, so a sweep with thousands of checkpoints would make every
query slow. The catalog builder therefore compacts: the keys of a table are taken in manifest order
in chunks of CHUNK_KEYS, and a chunk whose files all exist is rewritten as one file,
`tables/<table>/compacted/<digest>.parquet`, named by a digest of its source files' paths, sizes and
modification times. A view then reads one file per complete chunk and the files of the last,
incomplete one: at most len(keys) / CHUNK_KEYS + CHUNK_KEYS files. A source file that changes (a
re-run replaces a row) changes the digest, so a stale compacted file is never read. Source files are
never deleted (the tasks own them); compacted files no catalog names are removed after GRACE_S, so
a reader holding an older catalog keeps its files.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import write_atomic
from storage.layout import SweepLayout

CHUNK_KEYS = 256
COMPACTED_DIR = "compacted"
GRACE_S = 3600.0


def compacted_path(layout: SweepLayout, table: str, sources: Sequence[Path]) -> Path:
    """Where the chunk made of `sources` is (or would be) compacted: named by their paths, sizes and mtimes."""
    stats = []
    for source in sources:
        st = source.stat()
        stats.append([str(source), st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:24]
    return layout.table_dir(table) / COMPACTED_DIR / f"{digest}.parquet"


def bounded_files(layout: SweepLayout, table: str, files: Sequence[Path | None], compact: bool) -> list[Path]:
    """The files a view reads for `files` (one per key, None where a key has none yet): each complete chunk
    as its compacted file (written first when `compact`), the rest as they are."""
    chosen: list[Path] = []
    for start in range(0, len(files), CHUNK_KEYS):
        chunk = files[start:start + CHUNK_KEYS]
        present = [f for f in chunk if f is not None]
        if len(chunk) < CHUNK_KEYS or len(present) < len(chunk):
            chosen += present
            continue
        try:
            target = compacted_path(layout, table, present)
        except FileNotFoundError:  # a source replaced while we looked: read the sources this time
            chosen += present
            continue
        if not target.is_file() and compact:
            write_compacted(present, target)
        chosen += [target] if target.is_file() else present
    return chosen


def write_compacted(sources: Sequence[Path], target: Path) -> Path:
    """One Parquet file holding every row of `sources`; columns missing from older files read as NULL."""
    tables = [pq.read_table(source) for source in sources]
    merged = pa.concat_tables(tables, promote_options="default")
    sink = pa.BufferOutputStream()
    pq.write_table(merged, sink, compression="zstd")
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, sink.getvalue().to_pybytes())


def remove_unused_compacted(layout: SweepLayout, table: str, used: set[Path], now: float | None = None) -> list[Path]:
    """Remove compacted files of `table` that the new catalog does not read and are older than GRACE_S;
    call only under the catalog builders' lock."""
    folder = layout.table_dir(table) / COMPACTED_DIR
    now = time.time() if now is None else now
    removed = []
    for path in folder.glob("*.parquet") if folder.is_dir() else ():
        try:
            old = now - path.stat().st_mtime > GRACE_S
        except FileNotFoundError:
            continue
        if path not in used and old:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
