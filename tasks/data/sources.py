"""Where training items come from: sidecar captions, kohya repeat folders, metadata.jsonl or a CSV.

`load_items` is the one entry point, chosen by `DatasetSpec.source`. Every source reports all
its problems at once (DatasetError); paths named inside jsonl/CSV files must stay in the folder.
"""

from __future__ import annotations

import csv
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.data.captions import Captioner, fill_missing_captions, prefix_trigger
from tasks.data.dataset import (
    READABLE_SUFFIXES,
    DatasetError,
    DatasetItem,
    ScanProblems,
    check_count,
    inspect_image,
    opens_as_image,
    scan_dataset,
)
from tasks.sweep.spec import DatasetSpec

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset's items and what was left out: bad files skipped (dataset.on_bad_file = "skip") and
    files that are not images, each with its reason; `source` as read (auto resolved)."""

    items: list[DatasetItem]
    skipped: tuple[str, ...] = ()
    not_images: tuple[str, ...] = ()
    source: str = "sidecar"


def load_items(ds: DatasetSpec, folder: Path, *, min_size: int,
               captioner: Captioner | None = None) -> list[DatasetItem]:
    """The dataset's training items (see load_dataset)."""
    return load_dataset(ds, folder, min_size=min_size, captioner=captioner).items


def load_dataset(ds: DatasetSpec, folder: Path, *, min_size: int, captioner: Captioner | None = None) -> LoadedDataset:
    """Scan the dataset as `ds.source` says; caption what lacks a caption; add the trigger if asked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, [f"dataset.path {str(folder)!r} is not a folder"])
    source = resolved_source(ds, folder)
    problems = ScanProblems(skip_bad_files=ds.on_bad_file == "skip")
    common: dict[str, Any] = {"min_size": min_size, "allow_missing_captions": ds.captioner is not None,
                              "problems": problems}
    if source == "kohya":
        items = scan_kohya(folder, caption_extension=ds.caption_extension, **common)
    elif source == "metadata_jsonl":
        items = scan_metadata_jsonl(folder, ds.metadata_file, **common)
    elif source == "csv":
        items = scan_csv(folder, ds.csv_file or "", image_column=ds.csv_image_column,
                         caption_column=ds.csv_caption_column, template=ds.caption_template,
                         row_filter=ds.csv_filter, **common)
    else:
        items = scan_dataset(folder, caption_extension=ds.caption_extension, **common)
    check_count(folder, items, problems, ds.min_images)
    if captioner is not None:
        items = fill_missing_captions(items, captioner)
    if ds.prefix_trigger:
        items = [_with_caption(i, prefix_trigger(i.caption, ds.trigger_word)) if i.caption else i for i in items]
    return LoadedDataset(items, tuple(problems.skipped), tuple(problems.not_images), source)


def resolved_source(ds: DatasetSpec, folder: Path) -> str:
    """`auto` is kohya when the folder holds `N_name` repeat folders and no images of its own, else sidecar."""
    if ds.source != "auto":
        return ds.source
    children = list(folder.iterdir())
    repeat_folders = [c for c in children if c.is_dir() and KOHYA_FOLDER.match(c.name)]
    own_images = [c for c in children if c.is_file() and c.suffix.lower() in READABLE_SUFFIXES]
    return "kohya" if repeat_folders and not own_images else "sidecar"


def scan_kohya(folder: Path, *, caption_extension: str = ".txt", min_size: int = 8, min_images: int = 1,
               allow_missing_captions: bool = False, problems: ScanProblems | None = None) -> list[DatasetItem]:
    """kohya layout: `<folder>/<N>_<name>/` holds images + sidecar captions, each used N times per epoch."""
    found = problems if problems is not None else ScanProblems()
    items: list[DatasetItem] = []
    if KOHYA_FOLDER.match(folder.name) and any(c.is_file() and opens_as_image(c) for c in folder.iterdir()):
        found.errors.append(f"dataset.path {str(folder)!r} is itself a kohya repeat folder ({folder.name}); "
                            f"point dataset.path at the folder that holds it: {str(folder.parent)!r}")
        raise DatasetError(folder, found.errors)
    for child in sorted(folder.iterdir()):
        match = KOHYA_FOLDER.match(child.name)
        if child.name.startswith("."):
            continue
        if child.is_file() and opens_as_image(child):
            found.errors.append(f"{child.name}: kohya source wants images inside N_name folders, "
                                f"e.g. 10_{child.stem}/")
        elif child.is_file():
            found.not_images.append(f"{child.name}: not an image (no format Pillow reads)")
        elif not match or int(match.group(1)) < 1:
            found.errors.append(f"{child.name}/: not a kohya repeat folder; allowed: <repeats>=1..>_<name>, "
                                f"e.g. 100_VadymPanchenko")
        else:
            inner = ScanProblems(skip_bad_files=found.skip_bad_files)
            items += scan_dataset(child, caption_extension=caption_extension, min_size=min_size,
                                  allow_missing_captions=allow_missing_captions, repeats=int(match.group(1)),
                                  problems=inner)
            found.merge(inner, f"{child.name}/")
    if not found.errors and not items and not found.skipped:
        found.errors.append("kohya source found no N_name folders with images, e.g. img/100_VadymPanchenko/*.png")
    if problems is None:
        check_count(folder, items, found, min_images)
    return items


def scan_metadata_jsonl(folder: Path, metadata_file: str = "metadata.jsonl", *, min_size: int = 8,
                        min_images: int = 1, allow_missing_captions: bool = False,
                        problems: ScanProblems | None = None) -> list[DatasetItem]:
    """HF imagefolder style: one JSON object per line with `file_name` and `text`."""
    source = folder / metadata_file
    if not source.is_file():
        raise DatasetError(folder, [f"{metadata_file}: file not found in the dataset folder"])
    rows: list[tuple[str, dict[str, Any]]] = []
    found = problems if problems is not None else ScanProblems()
    for number, line in enumerate(_read_text(source, found.errors).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            found.errors.append(f"{metadata_file} line {number}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            found.errors.append(f"{metadata_file} line {number}: needs a 'file_name' string (and 'text')")
            continue
        text = row.get("text")
        rows.append((f"{metadata_file} line {number}", {"path": row["file_name"],
                                                        "caption": text if isinstance(text, str) else ""}))
    items = _rows_to_items(folder, rows, found, min_size, allow_missing_captions)
    if problems is None:
        check_count(folder, items, found, min_images)
    return items


def scan_csv(folder: Path, csv_file: str, *, image_column: str = "image", caption_column: str | None = None,
             template: str | None = None, row_filter: dict[str, tuple[str, ...]] | None = None,
             min_size: int = 8, min_images: int = 1, allow_missing_captions: bool = False,
             problems: ScanProblems | None = None) -> list[DatasetItem]:
    """A CSV with an image path column, a caption column or a template over columns, and a row filter."""
    source = folder / csv_file
    if not source.is_file():
        raise DatasetError(folder, [f"dataset.csv_file {csv_file!r}: file not found in the dataset folder"])
    found = problems if problems is not None else ScanProblems()
    reader = csv.DictReader(_read_text(source, found.errors).splitlines())
    columns = list(reader.fieldnames or [])
    wanted = {"csv_image_column": [image_column], "csv_caption_column": [caption_column] if caption_column else [],
              "caption_template": _template_fields(template), "csv_filter": list(row_filter or {})}
    for field_name, names in wanted.items():
        found.errors.extend(f"dataset.{field_name}: column {n!r} not found in {csv_file}; columns are: "
                            f"{', '.join(columns)}" for n in names if n not in columns)
    if found.errors:
        raise DatasetError(folder, found.errors)
    all_rows = list(reader)
    kept = [(n, r) for n, r in enumerate(all_rows, start=2)
            if all(r[c] in values for c, values in (row_filter or {}).items())]
    if not kept:
        raise DatasetError(folder, [f"dataset.csv_filter {dict(row_filter or {})!r} matches none of the "
                                    f"{len(all_rows)} rows of {csv_file}"])
    rows = [(f"{csv_file} row {n}", {"path": r[image_column] or "",
                                     "caption": (r[caption_column] or "") if caption_column else _fill(template, r)})
            for n, r in kept]
    items = _rows_to_items(folder, rows, found, min_size, allow_missing_captions)
    if problems is None:
        check_count(folder, items, found, min_images)
    return items


def _rows_to_items(folder: Path, rows: list[tuple[str, dict[str, Any]]], problems: ScanProblems, min_size: int,
                   allow_missing: bool) -> list[DatasetItem]:
    items = []
    for where, row in rows:
        path, problem = _inside(folder, row["path"])
        caption = row["caption"].strip()
        if problem is None and not caption and not allow_missing:
            problem = "caption is empty or missing"
        item = None
        if problem is None and path is not None:
            item, problem = inspect_image(path, folder, caption, min_size=min_size)
        if problem:
            problems.bad_file(f"{where}: {problem}")
        elif item:
            items.append(item)
    return items


def _inside(folder: Path, relative: str) -> tuple[Path | None, str | None]:
    """`relative` joined to the folder, or a problem when it is absolute or escapes the folder."""
    root = folder.resolve()
    candidate = Path(relative)
    if candidate.is_absolute() or not (root / candidate).resolve().is_relative_to(root):
        return None, f"image path {relative!r} escapes the dataset folder {root}; paths must be relative and inside it"
    if not (folder / candidate).is_file():
        return None, f"image {relative!r} not found in the dataset folder"
    return folder / candidate, None


def _read_text(path: Path, problems: list[str]) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        problems.append(f"{path.name}: not UTF-8 text")
        return ""


def _template_fields(template: str | None) -> list[str]:
    if not template:
        return []
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _fill(template: str | None, row: dict[str, str]) -> str:
    return (template or "").format_map({k: v or "" for k, v in row.items()})


def _with_caption(item: DatasetItem, caption: str) -> DatasetItem:
    return DatasetItem(item.image_id, item.path, caption, item.repeats, item.size)
