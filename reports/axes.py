"""The report's axes: every image column and every training option a sweep can vary, read from the tables.

Axes come from the columns DuckDB sees (not a fixed list), so a column another stage adds to
`images` or `runs` becomes an axis without touching the report. Training options reach each
image through its run (`report_images`, `images` joined with `runs`); the no-LoRA
baseline has no run, so its training values are NULL ("none").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from reports.charts import fmt

# Image columns that identify or describe an image rather than choose it.
NOT_IMAGE_AXES = frozenset({"sweep_id", "image_id", "render_id", "run_id", "checkpoint_id", "path", "render_s",
                            "prompt_index", "extra_loras", "prompt_tokens"})
# Run columns that are outcomes or bookkeeping, not options; base_model and rank are the image's own.
NOT_RUN_AXES = frozenset({"sweep_id", "run_id", "base_model", "rank", "base_model_path", "status", "error",
                          "num_images", "trainable_params", "steps_per_s", "peak_memory_mb", "wall_time_s",
                          "started_at", "finished_at", "run_dir", "skipped_files"})
LABELS = {
    "base_model": "base model", "rank": "LoRA rank", "checkpoint_step": "checkpoint step", "sampler": "sampler",
    "steps": "sampling steps", "lora_weight": "LoRA weight", "cfg_scale": "CFG scale", "seed": "seed",
    "prompt": "prompt", "negative_prompt": "negative prompt", "precision": "render precision",
    "alpha": "LoRA alpha", "learning_rate": "learning rate", "max_steps": "training steps",
    "training_seed": "training seed", "target_preset": "LoRA targets", "lr_scheduler": "LR scheduler",
    "dataset_name": "dataset", "variant": "training variant", "training_clip_skip": "training clip skip",
    "min_snr_gamma": "min-SNR gamma", "text_encoder_lr": "text encoder LR", "memory_preset_gib": "memory preset GiB",
    "lora_dropout": "LoRA dropout", "network": "network type", "train_text_encoder": "train text encoder",
}
# Which varying axes make the best default X and Y: training progress across, capacity down.
PREFERRED = ("checkpoint_step", "rank", "lora_weight", "sampler", "seed", "prompt", "cfg_scale", "steps",
             "base_model", "learning_rate")
# Render axes whose filter starts on one value; any other axis (training options, prompt sources, ...) starts
# on "all", since it may follow from an axis on the grid (alpha from rank) and fixing it would hide images.
FIXED_BY_DEFAULT = frozenset({"base_model", "rank", "checkpoint_step", "sampler", "steps", "lora_weight",
                              "cfg_scale", "seed", "prompt", "negative_prompt", "width", "height"})
NO_LORA = {"rank": "none (no LoRA)", "checkpoint_step": "none (no LoRA)"}
LATEST_RUN_ROW = ("(SELECT * FROM runs QUALIFY row_number() OVER "
                  "(PARTITION BY run_id ORDER BY finished_at DESC NULLS LAST) = 1)")


@dataclass(frozen=True)
class Axis:
    name: str  # column of report_images
    label: str
    values: list[Any]  # distinct values in display order
    labels: list[str]  # short text per value
    titles: list[str]  # full text per value (tooltips, viewer)
    default: int  # index of the value a filter starts on: the most common one
    training: bool  # a training option (from runs), not an image column
    varies: bool  # offered as a choice: more than one value (among LoRA images, for a training option)

    def constant(self) -> str | None:
        """The one value of an axis that does not vary (None when it was never recorded)."""
        known = [t for v, t in zip(self.values, self.titles) if v is not None]
        return known[0] if len(known) == 1 else None


def columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    """(name, DuckDB type) of every column the table's view has."""
    return [(row[0], row[1]) for row in con.execute(f"DESCRIBE SELECT * FROM {table}").fetchall()]


def axis_expr(source: str, column: str, kind: str) -> str | None:
    """A grouping-friendly expression for a column; lists become text, times and blobs are no axes."""
    if kind.endswith("[]"):
        return f"array_to_string({source}.\"{column}\", ', ')"
    if "TIMESTAMP" in kind or kind in ("BLOB", "INTERVAL") or kind.startswith(("STRUCT", "MAP")):
        return None
    return f'{source}."{column}"'


def create_report_images(con: duckdb.DuckDBPyConnection) -> list[tuple[str, bool]]:
    """Create the temp table `report_images` (images + their run's options); return (axis column, training)."""
    image_columns = columns(con, "images")
    image_names = {name for name, _ in image_columns}
    selected, axes = ["i.*"], []
    for name, kind in image_columns:
        if name not in NOT_IMAGE_AXES and axis_expr("i", name, kind):
            axes.append((name, False))
    for name, kind in columns(con, "runs"):
        expr = axis_expr("r", name, kind)
        if name in NOT_RUN_AXES or expr is None:
            continue
        alias = f"training_{name}" if name in image_names else name  # e.g. the run's seed is not the image's
        selected.append(f'{expr} AS "{alias}"')
        axes.append((alias, True))
    # A table, not a view: every later query (axes, slices, aggregates) then reads the Parquet files once.
    con.execute(f"CREATE OR REPLACE TEMP TABLE report_images AS SELECT {', '.join(selected)} FROM images i "
                f"LEFT JOIN {LATEST_RUN_ROW} r ON r.run_id = i.run_id")
    return axes


def sort_key(value: Any) -> tuple[int, Any]:
    """Nulls (the no-LoRA baseline) first, then numbers, then text: the order of SQL's NULLS FIRST."""
    if value is None:
        return (0, 0)
    return (1, value) if isinstance(value, (int, float)) else (2, str(value))


def value_text(name: str, value: Any) -> str:
    return NO_LORA.get(name, "none") if value is None else fmt(value)


def load_axes(con: duckdb.DuckDBPyConnection) -> list[Axis]:
    """Every candidate axis with its distinct values (one small GROUP BY per column: faster in DuckDB than one
    query of many histograms)."""
    axes = []
    for name, training in create_report_images(con):
        rows = con.execute(f"SELECT {q(name)}, count(*), count(*) FILTER (WHERE run_id IS NOT NULL) "
                           f"FROM report_images GROUP BY 1").fetchall()
        if rows:
            counts = {value: n for value, n, _ in rows}
            axes.append(make_axis(name, training, counts, sum(1 for _, _, lora in rows if lora)))
    preferred = {name: i for i, name in enumerate(PREFERRED)}
    # Image axes first in PREFERRED order, then the rest as the schema lists them.
    return sorted(axes, key=lambda a: (a.training, preferred.get(a.name, len(preferred))))


def make_axis(name: str, training: bool, counts: dict[Any, int], lora_values: int) -> Axis:
    """An axis from its value counts; a training option varies only among LoRA images (the baseline's NULL
    is no second value)."""
    distinct = sorted(counts, key=sort_key)
    titles = [value_text(name, v) for v in distinct]
    default = max(range(len(distinct)), key=lambda i: (counts[distinct[i]], -i))
    return Axis(name, LABELS.get(name, name.replace("_", " ")), distinct,
                [t if len(t) <= 60 else t[:57] + "…" for t in titles], titles, default, training,
                lora_values > 1 if training else len(distinct) > 1)


def q(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def grid_axes(axes: Sequence[Axis]) -> list[Axis]:
    """The axes offered as choices: those that vary, padded with fixed ones to at least two."""
    varying = [a for a in axes if a.varies]
    return varying + [a for a in axes if not a.varies][: max(0, 2 - len(varying))]


def default_xy(axes: Sequence[Axis]) -> tuple[str, str]:
    """The two most telling axes among the choices, in PREFERRED order."""
    names = [a.name for a in axes]
    ordered = [n for n in PREFERRED if n in names] + [n for n in names if n not in PREFERRED]
    return ordered[0], ordered[1]
