"""Build the HTML report of one sweep: `<sweep_root>/report/index.html`, its script and style, and `data/`.

index.html carries every aggregate (summary, heatmaps, axis effects, best by metric, loss curves,
runs) and stays small at any sweep size; the image grid's rows stream from DuckDB into slice files
(`reports.slices`) that the page loads on demand. Memory stays bounded by a slice, not the sweep.
Cheap to call again during a sweep: unchanged slices are not rewritten, and `progress` text shows
on the page while the sweep is under way.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import jinja2
from markupsafe import Markup

from reports.aggregates import axis_effects, create_metric_cells, heat_cells
from reports.axes import FIXED_BY_DEFAULT, Axis, default_xy, grid_axes, load_axes
from reports.charts import fmt, loss_chart
from reports.descriptions import lora_text, options_recorded, parse_extra_loras, run_options
from reports.ladder import ladder_section
from reports.report_data import SweepData, load_summary, open_catalog
from reports.slices import Hrefs, SliceWriter, write_slices
from storage.atomic import write_atomic
from storage.layout import SweepLayout
from storage.schema import SCHEMA_VERSION

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_FILES = ("report.css", "report.js")


def build_report(sweep_root: Path, progress: str | None = None) -> Path:
    """Read the sweep's tables, write the report, and return the path of its index.html.

    `progress` (e.g. "in progress: 3 of 8 runs, 120 of 400 images") is shown at the top of the page.
    """
    layout = SweepLayout(Path(sweep_root).resolve())
    out = layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:  # assets first, so index.html never points at a missing file
        write_atomic(out / name, (STATIC_DIR / name).read_bytes(), fsync=True)
    writer = SliceWriter(out, script_json)
    con = open_catalog(layout)
    try:
        context = report_context(con, layout, writer)
    finally:
        con.close()
    context["progress"] = progress
    index = write_atomic(out / "index.html", render_html(context).encode("utf-8"), fsync=True)
    writer.remove_others()  # after the swap: the new index.html names none of them
    return index


# One environment per process: the template compiles once however often a live sweep rebuilds the report.
TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                               undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def render_html(context: dict[str, Any]) -> str:
    """Render index.html.j2; autoescape is always on, whatever the file name."""
    return TEMPLATES.get_template("index.html.j2").render(**context)


def script_json(payload: Any) -> str:
    """JSON safe inside <script>: no `</`, `<!--` or `]]>` can appear, nor a raw line separator."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def file_href(path: str | None, hrefs: Hrefs) -> str | None:
    """Link to a file named in a table, or None when the row names none."""
    if not path:
        return None
    folder, name = os.path.split(hrefs.stored(path))
    return f"{hrefs.folder(folder)}/{quote(name)}"


def run_label(run: dict[str, Any]) -> str:
    """Short name of a training run for legends and tables."""
    return f"{run['base_model']} · rank {run['rank']} · lr {fmt(run['learning_rate'])} · {str(run['run_id'])[:8]}"


def spec_facts(spec: dict[str, Any] | None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Scalar spec and provenance entries, and package versions, as (name, value) pairs."""
    if not spec:
        return [], []
    provenance = spec.get("provenance") if isinstance(spec.get("provenance"), dict) else {}
    facts = [(key, fmt(value)) for source in (spec, provenance) for key, value in source.items()
             if isinstance(value, (str, int, float, bool)) or value is None]
    versions = spec.get("versions") or provenance.get("versions") or {}
    pairs = [(name, fmt(v)) for name, v in versions.items()] if isinstance(versions, dict) else []
    return facts, pairs


def summary(data: SweepData, layout: SweepLayout) -> dict[str, Any]:
    """Counts, provenance and the spec for the top of the report."""
    facts, versions = spec_facts(data.spec)
    report_facts = [
        ("sweep folder", str(layout.root)),
        ("report built", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("table schema version", str(SCHEMA_VERSION)),
        ("built with", f"Python {platform.python_version()}, DuckDB {duckdb.__version__}, Jinja2 {jinja2.__version__}"),
    ]
    return {
        "counts": data.counts,
        "facts": facts,
        "versions": versions,
        "report_facts": report_facts,
        "prompts": [(fmt(index), fmt(text)) for index, text in data.prompts],
        "extra_loras": sweep_extra_loras(data.extra_loras),
        "spec_json": json.dumps(data.spec, indent=2, sort_keys=True, default=str) if data.spec else None,
    }


def sweep_extra_loras(texts: Sequence[tuple[str, int]]) -> list[dict[str, str]]:
    """Each distinct extra LoRA stacked on the sweep's images, once, with how many images carry it."""
    counts: dict[tuple[Any, ...], int] = {}
    for text, images in texts:
        for lora in parse_extra_loras(text):
            key = (lora["name"], lora["weight"], lora["sha256"], lora["path"])
            counts[key] = counts.get(key, 0) + images
    return [{"text": lora_text({"name": name, "weight": weight}), "sha256": str(sha256 or "")[:12],
             "path": fmt(path), "images": str(n)} for (name, weight, sha256, path), n in counts.items()]


def best_rows(data: SweepData, hrefs: Hrefs) -> list[dict[str, Any]]:
    """The best (run, checkpoint) per metric, with links to its LoRA files."""
    return [{
        "metric": row["metric"],
        "direction": "higher is better" if row["higher"] else "lower is better",
        "mean": fmt(row["mean"]),
        "n": row["n"],
        "baseline": fmt(data.baseline_means.get(row["metric"])),
        "base_model": fmt(row["base_model"]),
        "rank": fmt(row["rank"]),
        "step": fmt(row["step"]),
        "run_id": fmt(row["run_id"]),
        "checkpoint_id": fmt(row["checkpoint_id"]),
        "lora_path": row["lora_path"],
        "lora_href": file_href(row["lora_path"], hrefs),
        "kohya_path": row["kohya_path"],
        "kohya_href": file_href(row["kohya_path"], hrefs),
    } for row in data.best]


def run_rows(runs: Sequence[dict[str, Any]], checkpoints: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every training run with its status, speed and checkpoint steps."""
    steps: dict[str, list[str]] = {}
    for ckpt in checkpoints:
        steps.setdefault(ckpt["run_id"], []).append(fmt(ckpt["step"]))
    return [{
        "label": run_label(run),
        "run_id": run["run_id"],
        "status": fmt(run["status"]),
        "failed": run["status"] == "failed",
        "error": run["error"] or "(no error message recorded)",
        "base_model": fmt(run["base_model"]),
        "cells": [fmt(run[key]) for key in ("rank", "alpha", "learning_rate", "max_steps",
                                            "trainable_params", "steps_per_s", "peak_memory_mb", "wall_time_s")],
        "options": run_options(run),
        "options_recorded": options_recorded(run),
        "checkpoints": ", ".join(steps.get(run["run_id"], [])) or "—",
        "started_at": fmt(run["started_at"]),
    } for run in runs]


def failed_render_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each failed render job: what it would have rendered, and why it did not."""
    return [{
        "label": (f"{row['base_model']} · run {row['run_id']} · step {row['checkpoint_step']}" if row["run_id"]
                  else f"{row['base_model']} · baseline (no LoRA)"),
        "render_id": row["render_id"],
        "images": fmt(row["planned_images"]),
        "recorded_at": fmt(row["recorded_at"]),
        "error": row["error"] or "(no error message recorded)",
    } for row in rows]


def grid_data(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis], writer: SliceWriter,
              hrefs: Hrefs) -> dict[str, Any]:
    """The grid's axes, defaults and slice list for report.js, writing the slices on the way."""
    choices = grid_axes(axes)
    if len(choices) < 2:
        return {"axes": [], "constants": [], "defaults": {}, "grid": [], "details": []}
    x, y = default_xy(choices)
    # The default view (X and Y free, every other axis fixed) is one run of rows: X and Y innermost.
    order = [a.name for a in choices if a.name not in (x, y)] + [y, x]
    slices = write_slices(con, choices, order, writer, hrefs)
    return {
        "axes": [{"name": a.name, "label": a.label, "values": a.labels, "titles": a.titles,
                  "default": a.default if a.name in FIXED_BY_DEFAULT else None,
                  "training": a.training} for a in choices],
        "constants": [[a.name, a.label, a.constant()] for a in axes if a not in choices and a.constant() is not None],
        "defaults": {"x": x, "y": y, "z": ""},
        **slices,
    }


def report_context(con: duckdb.DuckDBPyConnection, layout: SweepLayout, writer: SliceWriter) -> dict[str, Any]:
    """Everything index.html.j2 shows, already formatted: the template only loops."""
    hrefs = Hrefs(layout)
    data = load_summary(con, layout)
    axes = load_axes(con)
    grid = grid_data(con, axes, writer, hrefs)
    choices = [a for a in axes if a.name in {g["name"] for g in grid["axes"]}]
    metrics = list(data.higher_is_better)
    create_metric_cells(con, choices)
    grid["heat"] = {"metrics": [[m, data.higher_is_better[m]] for m in metrics],
                    **heat_cells(con, choices, metrics)}
    runs = run_rows(data.runs, data.checkpoints)
    return {
        "title": str((data.spec or {}).get("name") or layout.root.name),
        "summary": summary(data, layout),
        "grid": grid,
        "grid_json": Markup(script_json(grid)),  # already safe inside <script>: see script_json
        "effects": axis_effects(con, [a for a in choices if a.varies], metrics, data.higher_is_better),
        "loss_chart": loss_chart(data.losses, {r["run_id"]: run_label(r) for r in data.runs},
                                 validation=validation_series(data.checkpoints)),
        "runs_without_loss": [r["label"] for r in runs if r["run_id"] not in data.losses],
        "best": best_rows(data, hrefs),
        "runs": runs,
        "failed_runs": [r for r in runs if r["failed"]],
        "failed_renders": failed_render_rows(data.failed_renders),
        "ladder": ladder_section(con, {r["run_id"]: run_label(r) for r in data.runs}),  # None: a grid sweep
        # Bad dataset files left out with dataset.on_bad_file = "skip" (every run reads the same folder).
        "skipped_files": sorted({f for r in data.runs for f in (r.get("skipped_files") or [])}),
    }


def validation_series(checkpoints: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Held-out validation loss per run at its checkpoints (only where it was measured)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in sorted(checkpoints, key=lambda r: (r["run_id"], r["step"])):
        value = row.get("validation_loss")
        if value is not None and value == value:
            series.setdefault(row["run_id"], []).append((int(row["step"]), float(value)))
    return series
