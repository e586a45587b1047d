"""Build the self-contained HTML report of one sweep: `<sweep_root>/report/index.html`.

Data comes from `reports.report_data` (DuckDB over Parquet); this module turns it into
template context, renders it with Jinja2 (autoescape on) and writes files atomically.
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

from reports.charts import fmt, heatmaps, loss_chart
from reports.descriptions import lora_text, options_recorded, parse_extra_loras, run_options
from reports.grid import grid_payload, script_json
from reports.report_data import SweepData, load_sweep
from storage.atomic import write_atomic
from storage.layout import SweepLayout
from storage.schema import SCHEMA_VERSION

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATE_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_FILES = ("report.css", "report.js")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def build_report(sweep_root: Path) -> Path:
    """Read the sweep's tables, render the report, and return the path of its index.html."""
    layout = SweepLayout(Path(sweep_root).resolve())
    data = load_sweep(layout.root)
    html = render_html(report_context(data, layout))
    out = layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    for name in STATIC_FILES:  # assets first, so index.html never points at a missing file
        write_atomic(out / name, (STATIC_DIR / name).read_bytes(), fsync=True)
    return write_atomic(out / "index.html", html.encode("utf-8"), fsync=True)




def render_html(context: dict[str, Any]) -> str:
    """Render index.html.j2; autoescape is always on, whatever the file name."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("index.html.j2").render(**context)


def href(target: Path, layout: SweepLayout) -> str:
    """URL of `target` relative to the report folder (works from file:// and over HTTP)."""
    return quote(Path(os.path.relpath(target, layout.report_dir)).as_posix())


def stored_path(path: str, layout: SweepLayout) -> Path:
    """A path from a table: absolute as written, otherwise relative to the sweep root."""
    return Path(path) if Path(path).is_absolute() else layout.root / path


def image_href(row: dict[str, Any], layout: SweepLayout) -> str:
    """Where an image is, preferring the recorded path and falling back to images/<render_id>/."""
    recorded = stored_path(row["path"] or "", layout)
    moved = layout.render_dir(row["render_id"] or "") / recorded.name
    return href(moved if not recorded.is_file() and moved.is_file() else recorded, layout)


def file_href(path: str | None, layout: SweepLayout) -> str | None:
    """Link to a file named in a table, or None when the row names none."""
    return href(stored_path(path, layout), layout) if path else None


def reference(ref_id: str | None, srcs: dict[str, str], layout: SweepLayout) -> dict[str, Any] | None:
    """A metric's reference: another image of the sweep, an image file, or just its id."""
    if not ref_id:
        return None
    if ref_id in srcs:
        return {"label": f"image {ref_id}", "src": srcs[ref_id]}
    candidate = stored_path(ref_id, layout)
    if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
        return {"label": ref_id, "src": href(candidate, layout)}
    return {"label": ref_id, "src": None}


def metrics_by_image(data: SweepData, srcs: dict[str, str], layout: SweepLayout) -> dict[str, list[dict[str, Any]]]:
    """Each image's metric values, formatted, with their reference resolved."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in data.metrics:
        grouped.setdefault(row["image_id"], []).append({
            "name": row["metric"],
            "value": fmt(row["value"]),
            "better": "higher is better" if row["higher_is_better"] else "lower is better",
            "ref": reference(row["reference_id"], srcs, layout),
        })
    return grouped


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
    prompts = sorted({(row["prompt_index"], row["prompt"]) for row in data.images}, key=lambda p: (p[0] is None, p))
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
        "prompts": [(fmt(index), fmt(text)) for index, text in prompts],
        "extra_loras": sweep_extra_loras(data.images),
        "spec_json": json.dumps(data.spec, indent=2, sort_keys=True, default=str) if data.spec else None,
    }


def sweep_extra_loras(images: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """Each distinct extra LoRA stacked on the sweep's images, once, with how many images carry it."""
    counts: dict[tuple[Any, ...], int] = {}
    for row in images:
        for lora in parse_extra_loras(row.get("extra_loras")):
            key = (lora["name"], lora["weight"], lora["sha256"], lora["path"])
            counts[key] = counts.get(key, 0) + 1
    return [{"text": lora_text({"name": name, "weight": weight}), "sha256": str(sha256 or "")[:12],
             "path": fmt(path), "images": str(n)} for (name, weight, sha256, path), n in counts.items()]


def best_rows(data: SweepData, layout: SweepLayout) -> list[dict[str, Any]]:
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
        "lora_href": file_href(row["lora_path"], layout),
        "kohya_path": row["kohya_path"],
        "kohya_href": file_href(row["kohya_path"], layout),
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


def report_context(data: SweepData, layout: SweepLayout) -> dict[str, Any]:
    """Everything index.html.j2 shows, already formatted: the template only loops."""
    srcs = {row["image_id"]: image_href(row, layout) for row in data.images}
    metrics = metrics_by_image(data, srcs, layout)
    axes, payload = grid_payload(data.images, [srcs[row["image_id"]] for row in data.images],
                                 lambda image_id: metrics.get(image_id, []))
    runs = run_rows(data.runs, data.checkpoints)
    title = str((data.spec or {}).get("name") or layout.root.name)
    return {
        "title": title,
        "summary": summary(data, layout),
        "axes": axes,
        "defaults": payload["defaults"],
        "grid_json": Markup(script_json(payload)),  # already safe inside <script>: see script_json
        "heatmaps": heatmaps(data.heatmap_cells, data.higher_is_better),
        "loss_chart": loss_chart(data.losses, {r["run_id"]: run_label(r) for r in data.runs},
                                 validation=validation_series(data.checkpoints)),
        "runs_without_loss": [r["label"] for r in runs if r["run_id"] not in data.losses],
        "best": best_rows(data, layout),
        "runs": runs,
        "failed_runs": [r for r in runs if r["failed"]],
        "failed_renders": failed_render_rows(data.failed_renders),
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
