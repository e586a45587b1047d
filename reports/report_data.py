"""Everything the report shows, read from the sweep's Parquet tables through DuckDB.

Queries only: no HTML here. Each table becomes a view over the absolute glob of its
Parquet files; a table with no files yet is an empty table with the schema's columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from storage.catalog import Manifest, table_sql
from storage.layout import SweepLayout
from storage.schema import TABLES

Row = dict[str, Any]

# Every runs column, so options another stage adds reach the runs table's descriptions.
RUN_COLUMNS = """* REPLACE (CAST(started_at AS VARCHAR) AS started_at, CAST(finished_at AS VARCHAR) AS finished_at)"""

# Metric values joined to the image that produced them; NaN means "not computable", not a score.
METRIC_JOIN = """image_metrics m JOIN images i USING (image_id)
    WHERE m.value IS NOT NULL AND NOT isnan(m.value)"""


# Render jobs whose last attempt failed (their images are missing from the grid), baselines first.
FAILED_RENDERS = """SELECT render_id, base_model, run_id, checkpoint_step, error, planned_images,
    CAST(recorded_at AS VARCHAR) AS recorded_at FROM renders WHERE status = 'failed'
    ORDER BY base_model, checkpoint_step NULLS FIRST, run_id NULLS FIRST, render_id"""


@dataclass(frozen=True)
class SweepData:
    """The rows of one sweep, already ordered the way the report lists them."""

    spec: dict[str, Any] | None
    counts: dict[str, int]
    runs: list[Row]
    checkpoints: list[Row]
    prompts: list[tuple[Any, Any]]
    extra_loras: list[tuple[str, int]]  # each distinct images.extra_loras text and how many images carry it
    losses: dict[str, list[tuple[int, float]]]
    best: list[Row]
    baseline_means: dict[str, float]
    higher_is_better: dict[str, bool]
    failed_renders: list[Row]


def open_catalog(layout: SweepLayout) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with one view per table (never locks the sweep's catalog.duckdb).

    With a manifest (written by the flow) the views name exactly the current sweep's files;
    without one, every Parquet file under the sweep's tables/ folder is read.
    """
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # a long query must not print bars into the flow's logs
    manifest = Manifest.read(layout) if (layout.root / "manifest.json").exists() else None
    for table, schema in TABLES.items():
        if manifest is not None:
            con.execute(f"CREATE VIEW {table} AS {table_sql(layout, manifest, table)}")
        elif any(layout.table_dir(table).glob("*.parquet")):
            glob = layout.table_glob(table).replace("'", "''")
            # BY NAME with the typed empty table: a column added after these files were written reads as NULL.
            con.register(f"empty_{table}", schema.empty_table())
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{glob}', union_by_name = true) "
                        f"UNION ALL BY NAME SELECT * FROM empty_{table}")
        else:
            # read_parquet on an empty glob raises "No files found": an empty table reads as no rows.
            con.register(table, schema.empty_table())
    return con


def fetch(con: duckdb.DuckDBPyConnection, sql: str) -> list[Row]:
    """Run `sql` and return its rows as dicts keyed by column name."""
    cursor = con.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


def read_spec(layout: SweepLayout) -> dict[str, Any] | None:
    """The resolved sweep spec written next to the sweep, or None before it exists."""
    if not layout.spec_path.is_file():
        return None
    loaded = json.loads(layout.spec_path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {"spec": loaded}


def load_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Row counts shown in the summary."""
    row = con.execute(
        """SELECT
            (SELECT count(*) FROM runs),
            (SELECT count(*) FROM runs WHERE status = 'completed'),
            (SELECT count(*) FROM runs WHERE status = 'failed'),
            (SELECT count(*) FROM checkpoints),
            (SELECT count(*) FROM images),
            (SELECT count(*) FROM images WHERE run_id IS NULL),
            (SELECT count(DISTINCT metric) FROM image_metrics),
            (SELECT count(*) FROM image_metrics),
            (SELECT count(*) FROM losses)"""
    ).fetchone()
    keys = ("runs", "completed_runs", "failed_runs", "checkpoints", "images", "baseline_images",
            "metrics", "metric_values", "loss_points")
    return dict(zip(keys, (int(value) for value in row)))


def load_losses(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[int, float]]]:
    """Training loss per run, ordered by step."""
    series: dict[str, list[tuple[int, float]]] = {}
    rows = con.execute(
        "SELECT run_id, step, loss FROM losses WHERE loss IS NOT NULL AND NOT isnan(loss) "
        "ORDER BY run_id, step"
    ).fetchall()
    for run_id, step, loss in rows:
        series.setdefault(run_id, []).append((int(step), float(loss)))
    return series


def load_best(con: duckdb.DuckDBPyConnection) -> list[Row]:
    """For each metric, the (run, checkpoint) with the best mean value in the metric's direction."""
    return fetch(
        con,
        f"""WITH direction AS (
                SELECT metric, bool_or(higher_is_better) AS higher FROM image_metrics GROUP BY metric
            ), per_checkpoint AS (
                SELECT m.metric, i.run_id, i.checkpoint_id, avg(m.value) AS mean, count(*) AS n
                FROM {METRIC_JOIN} AND i.run_id IS NOT NULL
                GROUP BY ALL
            ), ranked AS (
                SELECT p.*, d.higher, row_number() OVER (
                    PARTITION BY p.metric
                    ORDER BY CASE WHEN d.higher THEN -p.mean ELSE p.mean END, p.run_id, p.checkpoint_id
                ) AS position
                FROM per_checkpoint p JOIN direction d USING (metric)
            )
            SELECT r.metric, r.mean, r.n, r.higher, r.run_id, r.checkpoint_id,
                c.step, c.lora_path, c.kohya_path, ru.base_model, ru.rank
            FROM ranked r
            LEFT JOIN checkpoints c ON c.checkpoint_id = r.checkpoint_id
            LEFT JOIN (SELECT DISTINCT run_id, base_model, rank FROM runs) ru ON ru.run_id = r.run_id
            WHERE r.position = 1 ORDER BY r.metric""",
    )


def load_baseline_means(con: duckdb.DuckDBPyConnection) -> dict[str, float]:
    """Mean of each metric over the no-LoRA baseline images, for comparison with the best."""
    rows = con.execute(
        f"SELECT m.metric, avg(m.value) FROM {METRIC_JOIN} AND i.run_id IS NULL GROUP BY m.metric"
    ).fetchall()
    return {metric: float(mean) for metric, mean in rows}


def load_directions(con: duckdb.DuckDBPyConnection) -> dict[str, bool]:
    """Whether a higher value is better, per metric name."""
    rows = con.execute(
        "SELECT metric, bool_or(higher_is_better) FROM image_metrics GROUP BY metric ORDER BY metric"
    ).fetchall()
    return {metric: bool(higher) for metric, higher in rows}


def load_sweep(root: Path) -> SweepData:
    """Read the sweep at `root` (and its spec.json when present): everything but the per-image rows."""
    layout = SweepLayout(Path(root).resolve())
    con = open_catalog(layout)
    try:
        return load_summary(con, layout)
    finally:
        con.close()


def load_summary(con: duckdb.DuckDBPyConnection, layout: SweepLayout) -> SweepData:
    """The sweep's aggregates and small tables from an open catalog; image rows are streamed elsewhere."""
    return SweepData(
        spec=read_spec(layout),
        counts=load_counts(con),
        runs=fetch(con, f"SELECT {RUN_COLUMNS} FROM runs ORDER BY base_model, rank, learning_rate, run_id"),
        checkpoints=fetch(con, "SELECT * FROM checkpoints ORDER BY run_id, step"),
        prompts=con.execute("SELECT DISTINCT prompt_index, prompt FROM images "
                            "ORDER BY prompt_index NULLS LAST, prompt").fetchall(),
        extra_loras=con.execute("SELECT extra_loras, count(*) FROM images WHERE extra_loras IS NOT NULL "
                                "GROUP BY 1 ORDER BY min(image_id)").fetchall(),
        losses=load_losses(con),
        best=load_best(con),
        baseline_means=load_baseline_means(con),
        higher_is_better=load_directions(con),
        failed_renders=fetch(con, FAILED_RENDERS),
    )
