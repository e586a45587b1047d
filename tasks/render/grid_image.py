"""Labelled X/Y grid images of one render job, in the manner of AUTOMATIC1111's X/Y/Z plot.

One PNG per combination of the z-axis values (by default steps, CFG, prompt and seed): X values
as columns, Y values as rows, labels drawn with Pillow's embedded font, a title naming the fixed
values. Grids sit beside the single images as `grid-<hash>.png`; an existing file is kept.
"""

from __future__ import annotations

import functools
import json
import threading
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from storage.atomic import atomic_file
from tasks.sweep.ids import content_id

GRID_KEY = "lora_sweep_grid"
GRID_PNG_COMPRESS_LEVEL = 1  # grids are derived from the images: save time over bytes
GRID_PREFIX = "grid-"
MIN_CELL_PX = 128  # smaller images are upscaled (NEAREST, whole factor) so labels stay legible
MAX_CELLS_WIDTH_PX = 3584  # cells shrink so cells + row labels (<= MAX_LABEL_WIDTH_PX) fit 4096 px
MAX_LABEL_WIDTH_PX = 512
MIN_LABEL_WIDTH_PX = 160
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
MISSING_COLOR = (160, 160, 160)
SEPARATOR = " · "
COLUMN_LABEL_LINES = 3
TITLE_LINES = 4
DEFAULT_Z_AXES = ("steps", "cfg_scale", "prompt_index", "seed")

Row = Mapping[str, Any]
_FONT_LOCK = threading.Lock()
# Characters Pillow's embedded Aileron lacks, spelled with ones it has.
_ASCII_SPELLING = {
    "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L",
    "đ": "d", "Đ": "D", "ı": "i", "–": "-", "—": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "×": "x",
}


@dataclass(frozen=True)
class GridPlan:
    """One grid file to compose: its path, fixed z values, axis values and the image of each cell."""

    path: Path
    x_axis: str
    y_axis: str
    z_values: tuple[tuple[str, Any], ...]
    x_values: tuple[Any, ...]
    y_values: tuple[Any, ...]
    cells: Mapping[tuple[int, int], Row]  # (column i, row j) -> image row; absent cells are missing

    @property
    def example(self) -> Row:
        return next(iter(self.cells.values()))


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry and wrapped label text of one grid image."""

    n_cols: int
    n_rows: int
    cell_w: int
    cell_h: int
    left_w: int
    title_h: int
    header_h: int
    label_size: int
    title_size: int
    title_lines: tuple[str, ...]
    col_lines: tuple[tuple[str, ...], ...]
    row_lines: tuple[tuple[str, ...], ...]

    @property
    def size(self) -> tuple[int, int]:
        return (self.left_w + self.n_cols * self.cell_w, self.title_h + self.header_h + self.n_rows * self.cell_h)

    def cell_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the cell in column i, row j."""
        x0, y0 = self.left_w + i * self.cell_w, self.title_h + self.header_h + j * self.cell_h
        return (x0, y0, x0 + self.cell_w, y0 + self.cell_h)


def axis_label(axis: str, row: Row) -> str:
    """How one axis value of an image row reads on the grid: "weight 0.5", "CFG 7", "Euler a"."""
    value = row[axis]
    if axis in ("prompt_index", "prompt"):
        return f"prompt: {row.get('prompt', value)}"
    if value is None:
        return f"{axis} none"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # "CFG 7", not "CFG 7.0"
    formats = {
        "lora_weight": "weight {}", "steps": "{} steps", "cfg_scale": "CFG {}", "seed": "seed {}",
        "rank": "rank {}", "checkpoint_step": "step {}", "sampler": "{}", "base_model": "{}",
    }
    return formats.get(axis, axis + " {}").format(value)


def job_title(row: Row) -> str:
    """What one render job is: "tiny-sd15 · rank 4 · step 200", or "tiny-sd15 · no LoRA"."""
    if row.get("checkpoint_id") is None:
        return f"{row['base_model']}{SEPARATOR}no LoRA"
    return SEPARATOR.join((str(row["base_model"]), f"rank {row['rank']}", f"step {row['checkpoint_step']}"))


def _ordered(values: Iterable[Any]) -> tuple[Any, ...]:
    """Distinct values: numbers ascending, anything else in first-seen order (the spec's order)."""
    distinct = tuple(dict.fromkeys(values))
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct):
        return tuple(sorted(distinct))
    return distinct


def _axis_problems(job_images: Sequence[Row], axes: Sequence[str]) -> list[str]:
    problems = [f"axis {a!r} is used more than once" for a in dict.fromkeys(axes) if axes.count(a) > 1]
    for axis in dict.fromkeys(axes):
        if any(axis not in row for row in job_images):
            problems.append(f"axis {axis!r} is not a column of the image rows (have: {', '.join(job_images[0])})")
    return problems


def plan_grids(
    job_images: Sequence[Row], out_dir: Path, *, x_axis: str = "lora_weight", y_axis: str = "sampler",
    z_axes: tuple[str, ...] = DEFAULT_Z_AXES,
) -> list[GridPlan]:
    """One plan per z combination that has images; ValueError naming every bad axis or shared cell."""
    if not job_images:
        return []
    axes = (x_axis, y_axis, *z_axes)
    problems = _axis_problems(job_images, axes)
    if problems:
        raise ValueError("cannot plan grid images:\n" + "\n".join(f"- {p}" for p in problems))
    xs, ys = _ordered(r[x_axis] for r in job_images), _ordered(r[y_axis] for r in job_images)
    z_orders = [_ordered(r[a] for r in job_images) for a in z_axes]
    grouped: dict[tuple[Any, ...], dict[tuple[int, int], list[Row]]] = {}
    for row in job_images:
        z_key = tuple(row[a] for a in z_axes)
        grouped.setdefault(z_key, {}).setdefault((xs.index(row[x_axis]), ys.index(row[y_axis])), []).append(row)
    _check_one_image_per_cell(grouped, axes)
    plans = []
    for z_key in sorted(grouped, key=lambda k: [order.index(v) for order, v in zip(z_orders, k)]):
        z_values = tuple(zip(z_axes, z_key))
        # The name hashes the axes and their values too: other rows or axes never reuse a stale grid.
        path = Path(out_dir) / f"{GRID_PREFIX}{content_id([x_axis, xs, y_axis, ys, z_values], 12)}.png"
        cells = {ij: rows[0] for ij, rows in sorted(grouped[z_key].items())}
        plans.append(GridPlan(path, x_axis, y_axis, z_values, xs, ys, cells))
    return plans


def _check_one_image_per_cell(grouped: Mapping[Any, Mapping[Any, list[Row]]], axes: Sequence[str]) -> None:
    """Two images in one cell mean a column that varies is on no axis: an error, not a silent pick."""
    shared = [rows for cells in grouped.values() for rows in cells.values() if len(rows) > 1]
    if shared:
        ignore = {*axes, "image_id", "path", "render_s"}
        varying = {k for rows in shared for k in rows[0] if k not in ignore and len({r.get(k) for r in rows}) > 1}
        raise ValueError(f"cannot plan grid images: {len(shared)} cells hold more than one image; put the varying "
                         f"columns on an axis: {', '.join(sorted(varying)) or '(none: duplicate rows)'}")


def plan_grid_files(
    job_images: Sequence[Row], out_dir: Path, *, x_axis: str = "lora_weight", y_axis: str = "sampler",
    z_axes: tuple[str, ...] = DEFAULT_Z_AXES,
) -> list[Path]:
    """The grid files `write_grid_images` writes for these rows, without reading or drawing anything."""
    return [p.path for p in plan_grids(job_images, out_dir, x_axis=x_axis, y_axis=y_axis, z_axes=z_axes)]


@functools.lru_cache(maxsize=16)
def grid_font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's embedded Aileron at `size` px: no font file needed (Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=4096)
def _has_glyph(size: int, char: str) -> bool:
    """Whether the grid font draws `char` as itself rather than its missing-glyph box."""
    missing, mask = grid_font(size).getmask("\uffff"), grid_font(size).getmask(char)
    return (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def drawable_text(text: str, size: int) -> str:
    """`text` with whitespace runs as one space and each character the font lacks spelled without
    accents (é -> e), in ASCII (ß -> ss) or as "?", so no prompt ever draws boxes or fails."""
    out = []
    for char in " ".join(text.split()):
        if _has_glyph(size, char):
            out.append(char)
            continue
        plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        plain = _ASCII_SPELLING.get(char, plain)
        out.append(plain if plain and all(_has_glyph(size, c) for c in plain) else "?")
    return "".join(out)


@functools.lru_cache(maxsize=16384)
def _width(text: str, size: int) -> float:
    return grid_font(size).getlength(text)  # the same labels recur in every grid of a sweep


def _fit(text: str, size: int, width: float) -> int:
    """How many leading characters of `text` fit in `width` (at least one, so wrapping ends)."""
    lo, hi = 1, min(len(text), max(1, int(width)))  # no character is under 1 px wide
    while lo < hi:  # bisect: a prompt may hold one very long word
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _width(text[:mid], size) <= width else (lo, mid - 1)
    return lo


def _break_word(word: str, size: int, width: float) -> list[str]:
    """A word wider than a line, cut into line-wide pieces."""
    pieces = []
    while (cut := _fit(word, size, width)) < len(word):
        pieces.append(word[:cut])
        word = word[cut:]
    return [*pieces, word]


def _wrap_units(units: Sequence[str], joiner: str, size: int, width: float) -> list[str]:
    """Greedy wrap breaking only between units where a unit fits a line; a longer one (a prompt)
    flows on word by word from where the line is, and a too-long word is cut."""
    lines: list[str] = []
    current = ""
    for unit in units:
        candidate = f"{current}{joiner}{unit}" if current else unit
        if _width(candidate, size) <= width:
            current = candidate
            continue
        if _width(unit, size) <= width or " " not in unit:
            lines.extend([current] if current else [])
            pieces = _break_word(unit, size, width)
        else:
            head, *rest = unit.split(" ")
            pieces = _wrap_units([f"{current}{joiner}{head}" if current else head, *rest], " ", size, width)
        lines.extend(pieces[:-1])
        current = pieces[-1]
    return [*lines, current]


def wrap_text(text: str, size: int, width: float, max_lines: int, *, separator: str = " ") -> tuple[str, ...]:
    """Wrap to `width` px between `separator`-joined parts where it can; past `max_lines`, end in "…"."""
    lines = _wrap_units(drawable_text(text, size).split(separator), separator, size, width)
    if len(lines) <= max_lines:
        return tuple(lines)
    ellipsis = "…" if _has_glyph(size, "…") else "..."
    last = lines[max_lines - 1]
    last = last[: _fit(last, size, width - _width(ellipsis, size))].rstrip()
    return (*lines[: max_lines - 1], last + ellipsis)


def cell_size(image_w: int, image_h: int, n_cols: int) -> tuple[int, int]:
    """Cell pixels: small images up by a whole factor to MIN_CELL_PX; all shrunk to fit MAX_CELLS_WIDTH_PX."""
    scale = float(max(1, -(-MIN_CELL_PX // max(1, min(image_w, image_h)))))
    scale = min(scale, MAX_CELLS_WIDTH_PX / (n_cols * image_w))
    return max(1, round(image_w * scale)), max(1, round(image_h * scale))


def grid_layout(
    x_labels: Sequence[str], y_labels: Sequence[str], title: str, image_size: tuple[int, int]
) -> GridLayout:
    """Geometry of a grid of `image_size` images with these column labels, row labels and title."""
    cell_w, cell_h = cell_size(*image_size, len(x_labels))
    label_size = min(40, max(14, min(cell_w, cell_h) // 8))
    title_size = label_size * 9 // 8
    pad = label_size // 2
    line_h = sum(grid_font(label_size).getmetrics())
    col_lines = tuple(wrap_text(t, label_size, cell_w - 2 * pad, COLUMN_LABEL_LINES) for t in x_labels)
    widest = max(_width(drawable_text(t, label_size), label_size) for t in y_labels)
    left_w = min(int(widest) + 1 + 2 * pad, min(max(cell_w, MIN_LABEL_WIDTH_PX), MAX_LABEL_WIDTH_PX))
    row_max_lines = max(1, (cell_h - 2 * pad) // line_h)
    row_lines = tuple(wrap_text(t, label_size, left_w - 2 * pad, row_max_lines) for t in y_labels)
    full_w = left_w + len(x_labels) * cell_w
    title_lines = wrap_text(title, title_size, full_w - 2 * pad, TITLE_LINES, separator=SEPARATOR) if title else ()
    title_h = 2 * pad + len(title_lines) * sum(grid_font(title_size).getmetrics()) if title_lines else 0
    header_h = 2 * pad + max(len(lines) for lines in col_lines) * line_h
    return GridLayout(
        n_cols=len(x_labels), n_rows=len(y_labels), cell_w=cell_w, cell_h=cell_h, left_w=left_w,
        title_h=title_h, header_h=header_h, label_size=label_size, title_size=title_size,
        title_lines=title_lines, col_lines=col_lines, row_lines=row_lines,
    )


def _draw_lines(draw: ImageDraw.ImageDraw, lines: Sequence[str], box: tuple[int, int, int, int], size: int) -> None:
    """Draw lines centred, horizontally and vertically, in box (left, top, right, bottom)."""
    line_h = sum(grid_font(size).getmetrics())
    centre_x = (box[0] + box[2]) // 2
    top = box[1] + (box[3] - box[1] - len(lines) * line_h) // 2
    for k, line in enumerate(lines):
        draw.text((centre_x, top + k * line_h), line, font=grid_font(size), fill=TEXT_COLOR, anchor="ma")


def _cell_image(path: str | Path, size: tuple[int, int]) -> Image.Image:
    """One image at cell size: NEAREST up (crisp pixels), LANCZOS down."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    resample = Image.Resampling.NEAREST if size[0] >= rgb.size[0] else Image.Resampling.LANCZOS
    return rgb if rgb.size == size else rgb.resize(size, resample)


def _axis_labels(axis: str, values: Sequence[Any], rows: Iterable[Row]) -> list[str]:
    """Labels of one axis's values, each read from a row holding it (a prompt index needs its text)."""
    holder = {row[axis]: row for row in rows}
    return [axis_label(axis, holder.get(v, {axis: v})) for v in values]


def grid_title(plan: GridPlan, title: str) -> str:
    """The caller's title, then each fixed z value, a prompt last: "tiny-sd15 · rank 4 · 20 steps · ..."."""
    z_axes = sorted((a for a, _ in plan.z_values), key=lambda a: a in ("prompt_index", "prompt"))
    return SEPARATOR.join(part for part in (title, *(axis_label(a, plan.example) for a in z_axes)) if part)


def plan_layout(plan: GridPlan, title: str) -> GridLayout:
    """The layout `compose_grid` draws this plan with (reads one image for the cell size)."""
    with Image.open(plan.example["path"]) as first:
        image_size = first.size
    x_labels = _axis_labels(plan.x_axis, plan.x_values, plan.cells.values())
    y_labels = _axis_labels(plan.y_axis, plan.y_values, plan.cells.values())
    return grid_layout(x_labels, y_labels, grid_title(plan, title), image_size)


def compose_grid(plan: GridPlan, title: str) -> Image.Image:
    """Draw one grid: title, column labels, row labels, then each cell's image (grey where missing)."""
    with _FONT_LOCK:  # the cached FreeType fonts are shared: one thread measures and draws text at a time
        layout = plan_layout(plan, title)
        canvas = Image.new("RGB", layout.size, BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        _draw_lines(draw, layout.title_lines, (0, 0, layout.size[0], layout.title_h), layout.title_size)
        for i, lines in enumerate(layout.col_lines):
            left, top, right, _ = layout.cell_box(i, 0)
            _draw_lines(draw, lines, (left, top - layout.header_h, right, top), layout.label_size)
        for j, lines in enumerate(layout.row_lines):
            _, top, _, bottom = layout.cell_box(0, j)
            _draw_lines(draw, lines, (0, top, layout.left_w, bottom), layout.label_size)
    for j in range(layout.n_rows):
        for i in range(layout.n_cols):
            box = layout.cell_box(i, j)
            row = plan.cells.get((i, j))
            if row is None:
                draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=MISSING_COLOR)
            else:
                canvas.paste(_cell_image(row["path"], (layout.cell_w, layout.cell_h)), box[:2])
    return canvas


def grid_metadata(plan: GridPlan, title: str) -> dict[str, Any]:
    """The `lora_sweep_grid` chunk: title, axes, their values, the fixed z values, each cell's image id."""
    ids = [[plan.cells[(i, j)].get("image_id") if (i, j) in plan.cells else None for i in range(len(plan.x_values))]
           for j in range(len(plan.y_values))]
    return {
        "title": grid_title(plan, title), "x_axis": plan.x_axis, "x_values": list(plan.x_values),
        "y_axis": plan.y_axis, "y_values": list(plan.y_values), "z": dict(plan.z_values), "image_ids": ids,
    }


def read_grid_metadata(path: str | Path) -> dict[str, Any]:
    """The `lora_sweep_grid` JSON of a grid PNG; ValueError if it has none."""
    with Image.open(path) as image:
        text = dict(image.text).get(GRID_KEY)
    if text is None:
        raise ValueError(f"{path}: no {GRID_KEY!r} text chunk; not a lora-sweep grid image")
    return json.loads(text)


def _save_atomic(image: Image.Image, path: Path, metadata: Mapping[str, Any]) -> None:
    info = PngInfo()
    info.add_text(GRID_KEY, json.dumps(metadata, sort_keys=True, ensure_ascii=False, default=str))
    with atomic_file(path) as handle:  # fast zlib level: a third of level 6's time for ~8% more bytes
        image.save(handle, format="PNG", pnginfo=info, compress_level=GRID_PNG_COMPRESS_LEVEL)


def write_grid_images(
    job_images: Sequence[Row], out_dir: Path, *, title: str, x_axis: str = "lora_weight",
    y_axis: str = "sampler", z_axes: tuple[str, ...] = DEFAULT_Z_AXES, workers: int = 1,
) -> list[Path]:
    """Write one labelled grid PNG per z combination of one render job's image rows; returns every grid path
    in plan order. A grid file already on disk is kept as it is (re-runs write nothing). With `workers` > 1
    grids are drawn and encoded on that many threads (zlib and image decoding release the GIL)."""
    plans = plan_grids(job_images, out_dir, x_axis=x_axis, y_axis=y_axis, z_axes=z_axes)

    def write(plan: GridPlan) -> None:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(compose_grid(plan, title), plan.path, grid_metadata(plan, title))

    missing = [plan for plan in plans if not plan.path.exists()]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing))), thread_name_prefix="grid") as pool:
        list(pool.map(write, missing))  # re-raises the first failure, once every started grid is done
    return [plan.path for plan in plans]
