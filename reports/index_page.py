"""The output folder's index page: `<output_dir>/index.html`, every sweep ever run there.

One row per sweep id (storage.history): when it started, its spec name and id, how it ended, its
runs and images, the best checkpoint per metric, and links to its report snapshot and, for the spec
last run under the name, the live report. Self-contained (inline CSS, no script), links relative, so
it opens from file:// and over HTTP alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import jinja2

from storage.atomic import write_atomic
from storage.history import SweepRecord, all_records

TEMPLATE = Path(__file__).resolve().parent / "templates" / "output_index.html.j2"


def build_index_page(output_dir: Path) -> Path:
    """Write `<output_dir>/index.html` from the sweep records there; returns its path."""
    output_dir = Path(output_dir).resolve()
    records = all_records(output_dir)
    rows = [_row(r, output_dir) for r in reversed(records)]  # newest first
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    html = env.from_string(TEMPLATE.read_text()).render(rows=rows, output_dir=str(output_dir),
                                                        catalog=str(output_dir / "catalog.duckdb"))
    return write_atomic(output_dir / "index.html", html.encode("utf-8"))


def _row(record: SweepRecord, output_dir: Path) -> dict[str, object]:
    root = Path(record.root)
    latest = _latest_sweep_id(root)
    return {
        "started": record.started_at.replace("T", " ").replace("+00:00", " UTC"),
        "name": record.name, "sweep_id": record.sweep_id, "status": record.status,
        "runs": len(record.run_ids), "images": record.images, "failures": record.failures,
        "best": [_best_text(b) for b in record.best],
        "report": record.report and _href(root / record.report, output_dir),
        "live_report": _href(root / "report" / "index.html", output_dir) if latest == record.sweep_id else None,
    }


def _best_text(best: dict[str, object]) -> dict[str, str]:
    labels = [f"{k} {best[k]}" for k in ("variant", "dataset_name") if best.get(k)]
    labels += [f"rank {best.get('rank')}", f"lr {best.get('learning_rate'):g}" if best.get("learning_rate") else "",
               f"step {best.get('checkpoint_step')}"]
    return {"metric": str(best.get("metric")), "value": f"{best.get('mean_value')}",
            "where": ", ".join(x for x in labels if x) + f" ({best.get('base_model')})"}


def _latest_sweep_id(root: Path) -> str | None:
    """The sweep id whose spec the folder's own report shows (its manifest's)."""
    try:
        return json.loads((root / "manifest.json").read_text())["sweep_id"]
    except (OSError, ValueError, KeyError):
        return None


def _href(target: Path, output_dir: Path) -> str:
    return quote(Path(os.path.relpath(target, output_dir)).as_posix())
