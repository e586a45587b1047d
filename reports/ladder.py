"""The report's ladder: an adaptive sweep's decisions rung by rung, on what evidence, and the training steps
it spent against the full grid of the same runs (the `ladder` table, flows/halving.py). None for a grid sweep."""

from __future__ import annotations

from typing import Any

import duckdb

from reports.charts import fmt

LADDER = """SELECT l.rung, l.step, l.run_id, l.metric, l.value, l.higher_is_better, l.place, l.competitors,
    l.kept, l.decision, r.max_steps
    FROM ladder AS l LEFT JOIN runs AS r USING (run_id)
    ORDER BY l.rung, l.place NULLS LAST, l.run_id"""


def ladder_section(con: duckdb.DuckDBPyConnection, labels: dict[str, str]) -> dict[str, Any] | None:
    """The ladder's rows formatted for the page, with the steps trained (each run's furthest rung) against the
    steps the full grid trains (each run's max_steps)."""
    cursor = con.execute(LADDER)
    names = [c[0] for c in cursor.description]
    rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    if not rows:
        return None
    furthest: dict[str, int] = {}
    grid: dict[str, int] = {}
    for row in rows:
        furthest[row["run_id"]] = max(furthest.get(row["run_id"], 0), int(row["step"]))
        grid[row["run_id"]] = int(row["max_steps"] or row["step"])
    spent, full = sum(furthest.values()), sum(grid.values())
    return {
        "metric": rows[0]["metric"],
        "direction": "higher is better" if rows[0]["higher_is_better"] else "lower is better",
        "steps_trained": spent, "grid_steps": full, "fraction": f"{spent / full:.0%}" if full else "",
        "rows": [{"rung": r["rung"], "step": r["step"], "run": labels.get(r["run_id"], r["run_id"]),
                  "run_id": r["run_id"], "value": fmt(r["value"]) if r["value"] is not None else "",
                  "place": f"{r['place']} of {r['competitors']}" if r["place"] is not None else "",
                  "decision": r["decision"], "bad": r["decision"] in ("pruned", "failed")} for r in rows],
    }
