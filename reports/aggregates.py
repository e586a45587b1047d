"""Metric aggregates over any axes: heatmap cells for every pair of varying axes, and each axis's effect.

Both pool the LoRA images (the no-LoRA baseline has its own mean in the best table) and skip
NaN values ("not computable", not a score). DuckDB first sums each metric over every
combination of the varying axes (`metric_cells`), then GROUPING SETS regroup that small table
per pair and per axis in one pass each, so the cost grows with combinations, not images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import duckdb

from reports.axes import Axis, q
from reports.charts import fmt

MAX_HEAT_CELLS = 400  # a pair of axes with more combinations than this gets no heatmap (too big to read)
MAX_EFFECT_VALUES = 40  # values listed per axis in the effects table


def create_metric_cells(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis]) -> None:
    """Temp table: per metric and combination of the axes' values, sum, sum of squares, count, min, max."""
    cols = ", ".join(f"i.{q(a.name)}" for a in axes)
    con.execute(f"""CREATE OR REPLACE TEMP TABLE metric_cells AS
        SELECT m.metric, {cols + ',' if cols else ''} sum(m.value) AS s, sum(m.value * m.value) AS ss,
            count(*) AS n, min(m.value) AS lo, max(m.value) AS hi
        FROM image_metrics m JOIN report_images i USING (image_id)
        WHERE m.value IS NOT NULL AND NOT isnan(m.value) AND i.run_id IS NOT NULL
        GROUP BY ALL""")


def grouped(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis], sets: Sequence[Sequence[int]],
            measures: str) -> list[tuple[int, tuple[Any, ...], tuple[Any, ...]]]:
    """metric_cells regrouped by each set of axis positions: (set number, axis values, measures) rows."""
    if not sets or not axes:
        return []
    names = [q(a.name) for a in axes]
    grouping = ", ".join(f"(metric, {', '.join(names[i] for i in s)})" for s in sets)
    rows = con.execute(f"SELECT metric, GROUPING({', '.join(names)}) AS g, {', '.join(names)}, {measures} "
                       f"FROM metric_cells GROUP BY GROUPING SETS ({grouping})").fetchall()
    width = len(axes)
    # GROUPING() sets a bit for each column left out, the first column in the highest bit.
    set_of = {sum(1 << (width - 1 - i) for i in range(width) if i not in s): k for k, s in enumerate(sets)}
    return [(set_of[row[1]], (row[0], *row[2:2 + width]), row[2 + width:]) for row in rows]


def heat_cells(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis], metrics: Sequence[str]) -> dict[str, Any]:
    """Mean and count per (metric, value of a, value of b) for every pair of axes small enough to draw;
    split by base model when it varies and is neither of the pair, as one heatmap per base model."""
    positions = [{v: i for i, v in enumerate(a.values)} for a in axes]
    base = next((k for k, a in enumerate(axes) if a.name == "base_model" and a.varies), None)
    pairs = [(i, j) for i, j in itertools.combinations(range(len(axes)), 2)
             if len(axes[i].values) * len(axes[j].values) <= MAX_HEAT_CELLS]
    sets = [[i, j] if base is None or base in (i, j) else [base, i, j] for i, j in pairs]
    metric_index = {m: k for k, m in enumerate(metrics)}
    cells: dict[str, list[list[Any]]] = {f"{axes[i].name}|{axes[j].name}": [] for i, j in pairs}
    for set_number, key, (mean, n) in grouped(con, axes, sets, "sum(s) / sum(n), sum(n)"):
        i, j = pairs[set_number]
        values = key[1:]
        split = -1 if len(sets[set_number]) == 2 else positions[base][values[base]]
        cells[f"{axes[i].name}|{axes[j].name}"].append([metric_index[key[0]], positions[i][values[i]],
                                                        positions[j][values[j]], float(f"{mean:.6g}"), int(n), split])
    skipped = [f"{axes[i].name}|{axes[j].name}" for i, j in itertools.combinations(range(len(axes)), 2)
               if (i, j) not in pairs]
    return {"cells": cells, "skipped": skipped, "max_cells": MAX_HEAT_CELLS,
            "split": None if base is None else axes[base].name}


def spread(s: float, ss: float, n: int) -> float | None:
    """Sample standard deviation from a sum and a sum of squares (None for one value)."""
    if n < 2:
        return None
    return math.sqrt(max(ss - s * s / n, 0.0) / (n - 1))


def axis_effects(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis], metrics: Sequence[str],
                 higher: dict[str, bool]) -> list[dict[str, Any]]:
    """Per metric, per varying axis: each value's mean, SD, min, max and count over every other axis;
    axes sorted by the range of their means (the biggest effect first)."""
    positions = [{v: i for i, v in enumerate(a.values)} for a in axes]
    found: dict[tuple[str, int], list[tuple[int, float, float | None, float, float, int]]] = {}
    measures = "sum(s), sum(ss), sum(n), min(lo), max(hi)"
    for k, key, (s, ss, n, lo, hi) in grouped(con, axes, [[i] for i in range(len(axes))], measures):
        index = positions[k][key[1 + k]]
        found.setdefault((key[0], k), []).append((index, s / n, spread(s, ss, n), lo, hi, int(n)))
    out = []
    for metric in metrics:
        per_axis = []
        for k, axis in enumerate(axes):
            rows = sorted(found.get((metric, k), []))
            if len(rows) < 2:
                continue
            means = [r[1] for r in rows]
            best = max(means) if higher.get(metric, True) else min(means)
            per_axis.append({
                "axis": axis.label, "name": axis.name, "range": max(means) - min(means),
                "range_text": fmt(max(means) - min(means)), "more": max(0, len(rows) - MAX_EFFECT_VALUES),
                "values": [{"value": axis.titles[i], "mean": fmt(mean), "sd": fmt(sd), "low": fmt(lo),
                            "high": fmt(hi), "n": n, "best": mean == best,
                            "bar": 0 if max(means) == min(means) else round(100 * (mean - min(means))
                                                                            / (max(means) - min(means)))}
                           for i, mean, sd, lo, hi, n in rows[:MAX_EFFECT_VALUES]],
            })
        per_axis.sort(key=lambda e: -e["range"])
        out.append({"metric": metric, "direction": "higher is better" if higher.get(metric, True)
                    else "lower is better", "axes": per_axis})
    return out
