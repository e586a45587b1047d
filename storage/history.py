"""Every sweep ever run under an output folder: one small JSON record per sweep id.

A sweep's folder (`<output_dir>/<name>`) holds one record per distinct spec run under that name
(`sweeps/<sweep_id>.json`): when it started and finished, how it ended, which runs and render jobs it
listed and in which sweep folder each one's files are (a run or render another sweep already made is
used where it is, never made twice), its best results, and its report. Re-running a changed spec under
the same name adds a record; the earlier one, its files and its report snapshot stay. The output-level
catalog and index page (storage.output_catalog, reports.index_page) are built from these records.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage.atomic import write_atomic
from storage.catalog import Manifest

HISTORY_DIR = "sweeps"


@dataclass(frozen=True)
class SweepRecord:
    """One sweep id's entry in the history of its sweep folder."""

    sweep_id: str
    name: str
    root: str  # the sweep folder, absolute
    started_at: str  # ISO 8601, UTC: the first flow run of this sweep id
    status: str = "running"  # "running" | "completed" | "failed"
    finished_at: str | None = None
    run_ids: tuple[str, ...] = ()
    render_ids: tuple[str, ...] = ()
    run_roots: dict[str, str] = field(default_factory=dict)  # run id -> the sweep folder holding it, when not root
    render_roots: dict[str, str] = field(default_factory=dict)
    zero_weight_in_grid: bool = True
    images: int = 0
    best: tuple[dict[str, Any], ...] = ()  # best checkpoint per metric (the catalog's best_by_metric)
    report: str | None = None  # the report snapshot of this sweep id, relative to root
    failures: tuple[str, ...] = ()
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest(self) -> Manifest:
        return Manifest(self.sweep_id, self.run_ids, self.render_ids, self.zero_weight_in_grid,
                        self.run_roots, self.render_roots)


def record_path(root: Path, sweep_id: str) -> Path:
    return Path(root) / HISTORY_DIR / f"{sweep_id}.json"


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def start_record(root: Path, sweep_id: str, name: str, spec: dict[str, Any]) -> SweepRecord:
    """The sweep id's record at the start of a flow run: a new one, or the earlier one marked running
    again (a resumed or re-run sweep keeps its first start time)."""
    earlier = read_record(record_path(root, sweep_id))
    if earlier is None:
        record = SweepRecord(sweep_id, name, str(Path(root).resolve()), now_text(), spec=spec)
    else:
        record = replace(earlier, status="running", finished_at=None, spec=spec)
    write_record(record)
    return record


def write_record(record: SweepRecord) -> Path:
    path = record_path(Path(record.root), record.sweep_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(asdict(record), indent=2, default=str).encode())


def read_record(path: Path) -> SweepRecord | None:
    """A record, or None when the file is missing or not a record (a damaged file is skipped, not fatal)."""
    try:
        data = json.loads(path.read_text())
        data["run_ids"], data["render_ids"] = tuple(data["run_ids"]), tuple(data["render_ids"])
        data["best"], data["failures"] = tuple(data.get("best", ())), tuple(data.get("failures", ()))
        return SweepRecord(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def sweep_roots(output_dir: Path) -> list[Path]:
    """The sweep folders under an output folder: those holding a history record or a manifest."""
    if not Path(output_dir).is_dir():
        return []
    return sorted(p for p in Path(output_dir).iterdir()
                  if p.is_dir() and ((p / HISTORY_DIR).is_dir() or (p / "manifest.json").is_file()))


def all_records(output_dir: Path) -> list[SweepRecord]:
    """Every sweep record under the output folder, oldest start first."""
    records = [r for root in sweep_roots(output_dir) for path in sorted((root / HISTORY_DIR).glob("*.json"))
               if (r := read_record(path)) is not None]
    return sorted(records, key=lambda r: (r.started_at, r.name, r.sweep_id))
