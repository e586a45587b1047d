"""The image grid's rows as small script files under `report/data/`, written while DuckDB streams them.

index.html carries only a zone map per slice (which values of each axis the slice holds), so the
browser loads, with `<script src>` (which file:// allows, unlike fetch), just the slices the
current view can show. Rows are ordered with the default X and Y innermost: the first view reads
one or two slices. Per-image details (metrics, other parameters) sit in smaller files of their
own, read when the viewer opens an image. File names are content hashes: a rebuild rewrites only
slices whose rows changed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb

from reports.axes import Axis, q
from reports.charts import fmt
from reports.descriptions import extra_loras_text, parse_extra_loras
from storage.atomic import write_atomic
from storage.layout import SweepLayout

GRID_ROWS = 2000  # rows per grid slice: ~100 KB of script
DETAIL_ROWS = 250  # rows per detail file: what the viewer reads for one image
MAX_RANGES = 6  # zone-map ranges per axis and slice before they merge into one min-max range
EXTRA_PARAMS = ("run_id", "checkpoint_id", "render_s", "prompt_tokens", "image_id")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
DATA_DIR = "data"
CALLBACK = "loraSweepSlice"

# Each image's metrics as one list, with the path of a reference that is another image of the sweep.
METRIC_LISTS = """SELECT m.image_id, list(struct_pack(name := m.metric, value := m.value,
        higher := m.higher_is_better, ref := m.reference_id, ref_path := r.path, ref_render := r.render_id)
        ORDER BY m.metric) AS metric_list
    FROM image_metrics m LEFT JOIN (SELECT DISTINCT ON (image_id) image_id, path, render_id FROM images) r
        ON r.image_id = m.reference_id
    GROUP BY m.image_id"""


class Hrefs:
    """Image links relative to the report folder: string paths, one relpath and one listdir per folder
    (not per image), and each metric reference resolved once. The per-image path work of a large sweep."""

    def __init__(self, layout: SweepLayout) -> None:
        self.layout = layout
        self.root = str(layout.root)
        self.report = str(layout.report_dir)
        self.folders: dict[str, str] = {}
        self.listings: dict[str, frozenset[str]] = {}
        self.references: dict[tuple[Any, ...], dict[str, Any] | None] = {}

    def stored(self, path: str) -> str:
        """A path from a table: absolute as written, otherwise relative to the sweep root."""
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    def folder(self, folder: str) -> str:
        if folder not in self.folders:
            self.folders[folder] = quote(Path(os.path.relpath(folder, self.report)).as_posix())
        return self.folders[folder]

    def exists(self, folder: str, name: str) -> bool:
        if folder not in self.listings:
            try:
                self.listings[folder] = frozenset(os.listdir(folder))
            except OSError:
                self.listings[folder] = frozenset()
        return name in self.listings[folder]

    def image(self, path: str | None, render_id: str | None) -> tuple[str, str]:
        """(folder href, file name): the recorded path, or images/<render_id>/ where the file was moved."""
        folder, name = os.path.split(self.stored(path or ""))
        if not self.exists(folder, name):
            moved = str(self.layout.render_dir(render_id or ""))
            if self.exists(moved, name):
                folder = moved
        return self.folder(folder), name

    def src(self, path: str | None, render_id: str | None) -> str:
        folder, name = self.image(path, render_id)
        return f"{folder}/{quote(name)}"

    def reference(self, metric: dict[str, Any]) -> dict[str, Any] | None:
        """A metric's reference: another image of the sweep, an image file, or just its id."""
        key = (metric["ref"], metric["ref_path"], metric["ref_render"])
        if key not in self.references:
            if len(self.references) > 50_000:  # references are few (baselines, training images); stay bounded
                self.references.clear()
            self.references[key] = self.resolve(*key)
        return self.references[key]

    def resolve(self, ref: str | None, ref_path: str | None, ref_render: str | None) -> dict[str, Any] | None:
        if not ref:
            return None
        if ref_path is not None:
            return {"label": f"image {ref}", "src": self.src(ref_path, ref_render)}
        candidate = self.stored(ref)
        if os.path.splitext(candidate)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(candidate):
            return {"label": ref, "src": self.src(ref, None)}
        return {"label": ref, "src": None}


@dataclass
class Slice:
    """One grid slice being filled: its rows, the folders they use, and per axis the value indexes seen."""

    folders: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    seen: list[set[int]] = field(default_factory=list)


def zone(indexes: set[int]) -> list[list[int]]:
    """Sorted value indexes as [lo, hi] ranges; merged into one range when there are many."""
    ranges: list[list[int]] = []
    for i in sorted(indexes):
        if ranges and ranges[-1][1] == i - 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    return ranges if len(ranges) <= MAX_RANGES else [[ranges[0][0], ranges[-1][1]]]


def script_text(kind: str, number: int, payload: Any, to_json) -> bytes:
    return f"{CALLBACK}({to_json(kind)},{number},{to_json(payload)});\n".encode()


class SliceWriter:
    """Writes slice files under report/data/ with content-hash names; remembers every name it wrote."""

    def __init__(self, out: Path, to_json) -> None:
        self.out, self.to_json = out / DATA_DIR, to_json
        self.out.mkdir(parents=True, exist_ok=True)
        self.names: set[str] = set()

    def write(self, kind: str, number: int, payload: Any) -> str:
        data = script_text(kind, number, payload, self.to_json)
        name = f"{kind}-{number:05d}-{hashlib.sha1(data).hexdigest()[:12]}.js"
        if not (self.out / name).is_file():  # same rows as the last build: nothing to write
            write_atomic(self.out / name, data)
        self.names.add(name)
        return f"{DATA_DIR}/{name}"

    def remove_others(self) -> None:
        """Delete slice files of earlier builds that the new index.html no longer names."""
        for path in self.out.glob("*.js"):
            if path.name not in self.names:
                path.unlink(missing_ok=True)


def stream_rows(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis], order: Sequence[str],
                batch: int = 500) -> Iterator[dict[str, Any]]:
    """report_images rows (axes, image fields, metric list) in slice order, `batch` rows at a time."""
    names = {row[0] for row in con.execute("DESCRIBE SELECT * FROM report_images").fetchall()}
    extras = [n for n in ("path", "render_id", "extra_loras", *EXTRA_PARAMS) if n in names]
    picked = list(dict.fromkeys([a.name for a in axes] + extras))
    cursor = con.execute(
        f"WITH ml AS ({METRIC_LISTS}) SELECT {', '.join(f'i.{q(n)}' for n in picked)}, ml.metric_list "
        f"FROM report_images i LEFT JOIN ml USING (image_id) "
        f"ORDER BY {', '.join(f'i.{q(n)} NULLS FIRST' for n in order)}, i.image_id")
    keys = [*picked, "metric_list"]
    while rows := cursor.fetchmany(batch):
        for values in rows:
            yield dict(zip(keys, values))


def detail(row: dict[str, Any], hrefs: Hrefs) -> list[Any]:
    """[other parameters, metrics] of one image, for the viewer."""
    loras = extra_loras_text(parse_extra_loras(row.get("extra_loras")))
    extra = [["extra_loras", loras]] * bool(loras) + [[n, fmt(row.get(n))] for n in EXTRA_PARAMS if n in row]
    metrics = [{"name": m["name"], "value": fmt(m["value"]),
                "better": "higher is better" if m["higher"] else "lower is better",
                "ref": hrefs.reference(m)} for m in row["metric_list"] or []]
    return [extra, metrics]


def write_slices(con: duckdb.DuckDBPyConnection, axes: Sequence[Axis], order: Sequence[str],
                 writer: SliceWriter, hrefs: Hrefs) -> dict[str, Any]:
    """Stream every image into grid slices and detail files; return what index.html needs to find them."""
    positions = [{v: i for i, v in enumerate(a.values)} for a in axes]
    grid: list[dict[str, Any]] = []
    details: list[str] = []
    current, pending, folder_index = Slice(seen=[set() for _ in axes]), [], {}

    def flush_grid() -> None:
        nonlocal current, folder_index
        if current.rows:
            file = writer.write("grid", len(grid), {"folders": current.folders, "rows": current.rows})
            grid.append({"file": file, "n": len(current.rows), "zones": [zone(s) for s in current.seen]})
        current, folder_index = Slice(seen=[set() for _ in axes]), {}

    for row in stream_rows(con, axes, order):
        folder, name = hrefs.image(row.get("path"), row.get("render_id"))
        if folder not in folder_index:
            folder_index[folder] = len(current.folders)
            current.folders.append(folder)
        ax = [positions[i][row[a.name]] for i, a in enumerate(axes)]
        for seen, index in zip(current.seen, ax):
            seen.add(index)
        current.rows.append([folder_index[folder], quote(name), *ax])
        pending.append(detail(row, hrefs))
        if len(pending) == DETAIL_ROWS:
            details.append(writer.write("detail", len(details), pending))
            pending = []
        if len(current.rows) == GRID_ROWS:
            flush_grid()
    flush_grid()
    if pending:
        details.append(writer.write("detail", len(details), pending))
    return {"grid": grid, "grid_rows": GRID_ROWS, "details": details, "detail_rows": DETAIL_ROWS}
