"""Where every artifact of a sweep lives on disk: one place so tasks, catalog and report agree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FALLBACK_TABLES = ("runs",)  # tables whose row has a second place to go (SweepLayout.fallback_table_file)


@dataclass(frozen=True)
class SweepLayout:
    """Paths under one sweep's root folder (`<output_dir>/<sweep name>-<sweep id>`)."""

    root: Path

    @property
    def spec_path(self) -> Path:
        return self.root / "spec.json"

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def table_dir(self, table: str) -> Path:
        return self.tables_dir / table

    def table_file(self, table: str, key: str) -> Path:
        """One Parquet file per producing task: `tables/<table>/<key>.parquet`."""
        return self.table_dir(table) / f"{key}.parquet"

    def fallback_table_file(self, table: str, key: str) -> Path:
        """Where a run writes its own `runs` row when `tables/runs/` refuses the write: its run folder."""
        return self.run_dir(key) / f"{table}-row.parquet"

    def row_file(self, table: str, key: str) -> Path | None:
        """The file holding the producing task's rows: the newer of its table file and (for `runs`) its
        fallback; None when neither exists. Neither is ever deleted, so a reader never loses one."""
        candidates = [self.table_file(table, key)]
        if table in FALLBACK_TABLES:
            candidates.append(self.fallback_table_file(table, key))
        written = []
        for path in candidates:
            try:
                written.append((path.stat().st_mtime_ns, path))
            except FileNotFoundError:
                continue
        return max(written)[1] if written else None

    def table_glob(self, table: str) -> str:
        return str(self.table_dir(table).resolve() / "*.parquet")

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def checkpoint_dir(self, run_id: str, step: int) -> Path:
        return self.run_dir(run_id) / "checkpoints" / f"step-{step:06d}"

    def render_dir(self, render_id: str) -> Path:
        return self.root / "images" / render_id

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"
