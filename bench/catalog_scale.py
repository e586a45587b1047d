"""`python -m bench.catalog_scale [--checkpoints N ...]`: query time of a sweep catalog against its file count.

Writes synthetic `images` files of the project's schema, one per render job (as render tasks do), for
sweeps of N checkpoint render jobs, builds the catalog twice (every file listed, as before
compaction; and compacted, storage.compaction) and times `SELECT count(*)` and a GROUP BY on each.
Prints one row per size: files the view reads, first and repeated build seconds, query seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import duckdb

from storage import compaction
from storage.catalog import Manifest, build_catalog
from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from storage.schema import IMAGES

ROWS_PER_JOB = 8
QUERIES = {"count": "SELECT count(*) FROM images",
           "group": "SELECT sampler, lora_weight, count(*), avg(render_s) FROM images GROUP BY ALL"}


def job_rows(render_id: str) -> list[dict[str, object]]:
    row = {name: None for name in IMAGES.names}
    row.update(sweep_id="bench", render_id=render_id, base_model="m", sampler="Euler a", steps=20, lora_weight=1.0,
               cfg_scale=7.0, prompt_index=0, prompt="p", negative_prompt="", seed=0, width=512, height=512,
               path="/x.png", render_s=0.5)
    return [{**row, "image_id": f"{render_id}-{i}"} for i in range(ROWS_PER_JOB)]


def timed(catalog: Path, sql: str, repeats: int = 3) -> float:
    with duckdb.connect(str(catalog), read_only=True) as con:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            con.execute(sql).fetchall()
            best = min(best, time.perf_counter() - start)
    return best


def measure(jobs: int, folder: Path) -> list[tuple]:
    layout = SweepLayout(folder / f"sweep-{jobs}")
    ids = tuple(f"job{i:06d}" for i in range(jobs))
    for render_id in ids:
        write_rows("images", job_rows(render_id), layout.table_file("images", render_id))
    manifest = Manifest("bench", (), ids)
    results = []
    for label, chunk in (("every file", 10**9), ("compacted", compaction.CHUNK_KEYS)):
        with mock.patch.object(compaction, "CHUNK_KEYS", chunk):
            start = time.perf_counter()
            build_catalog(layout, manifest)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            build_catalog(layout, manifest)  # as a live or final rebuild does: compacted chunks are reused
            rebuild_s = time.perf_counter() - start
            with duckdb.connect(str(layout.catalog_path), read_only=True) as con:
                plan = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'images'").fetchone()[0]
        files = plan.count(".parquet'")
        results.append((jobs, label, files, build_s, rebuild_s, *(timed(layout.catalog_path, q) for q in QUERIES.values())))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[100, 1000, 10000])
    args = parser.parse_args(argv)
    print("| render jobs | views read | files | build s | rebuild s | count(*) s | group by s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in args.checkpoints:
            for row in measure(jobs, Path(tmp)):
                print("| {} | {} | {} | {:.2f} | {:.2f} | {:.3f} | {:.3f} |".format(*row), flush=True)


if __name__ == "__main__":
    main()
