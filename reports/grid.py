"""The X/Y/Z image grid's data: axes with their sorted values, and one compact record per image.

Images refer to axis values by index, so the browser never compares floats or nulls.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from reports.charts import fmt
from reports.descriptions import extra_loras_text, parse_extra_loras

AXES: dict[str, str] = {
    "base_model": "base model",
    "rank": "LoRA rank",
    "checkpoint_step": "checkpoint step",
    "sampler": "sampler",
    "steps": "sampling steps",
    "lora_weight": "LoRA weight",
    "cfg_scale": "CFG scale",
    "seed": "seed",
    "prompt": "prompt",
}
# Which varying axes make the best default X and Y: training progress across, capacity down.
PREFERRED = ("checkpoint_step", "rank", "lora_weight", "sampler", "seed", "prompt",
             "cfg_scale", "steps", "base_model")
# Shown in the viewer beside the axis values (which the browser looks up by index).
EXTRA_PARAMS = ("negative_prompt", "width", "height", "run_id", "checkpoint_id", "render_s", "image_id")
NO_LORA = {"rank": "none (no LoRA)", "checkpoint_step": "none (no LoRA)"}


@dataclass(frozen=True)
class AxisValue:
    label: str
    title: str


@dataclass(frozen=True)
class Axis:
    name: str
    label: str
    values: list[AxisValue]
    default: int  # index of the value a filter starts on: the most common one


def sort_key(value: Any) -> tuple[int, Any]:
    """Nulls (the no-LoRA baseline) first, then numbers, then text."""
    if value is None:
        return (0, 0)
    return (1, value) if isinstance(value, (int, float)) else (2, str(value))


def value_label(axis: str, value: Any) -> AxisValue:
    """Short label for a header cell; the full text goes in the tooltip."""
    text = NO_LORA.get(axis, "none") if value is None else fmt(value)
    short = text if len(text) <= 60 else text[:57] + "…"
    return AxisValue(short, text)


def build_axes(images: Sequence[dict[str, Any]]) -> tuple[list[Axis], dict[str, list[Any]]]:
    """Every grid axis with its distinct values in display order."""
    axes, values = [], {}
    for name, label in AXES.items():
        counts = Counter(row[name] for row in images)
        distinct = sorted(counts, key=sort_key)
        values[name] = distinct
        # The baseline's lora_weight 0 sorts first but covers few images: start on the commonest.
        default = max(range(len(distinct)), key=lambda i: (counts[distinct[i]], -i), default=0)
        axes.append(Axis(name, label, [value_label(name, v) for v in distinct], default))
    return axes, values


def default_xy(values: dict[str, list[Any]]) -> tuple[str, str]:
    """The two most telling axes that actually vary; fixed ones only when fewer vary."""
    varying = [a for a in PREFERRED if len(values.get(a, ())) > 1]
    ordered = varying + [a for a in PREFERRED if a not in varying]
    return ordered[0], ordered[1]


def image_record(row: dict[str, Any], positions: dict[str, dict[Any, int]], src: str,
                 metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """What the browser needs for one image: its src, axis indexes, other parameters, metrics."""
    loras = extra_loras_text(parse_extra_loras(row.get("extra_loras")))
    return {
        "src": src,
        "ax": [positions[axis][row[axis]] for axis in AXES],
        "extra": [["extra_loras", loras]] * bool(loras) + [[name, fmt(row.get(name))] for name in EXTRA_PARAMS],
        "metrics": metrics,
    }


def grid_payload(images: Sequence[dict[str, Any]], srcs: Sequence[str],
                 metrics_for: Callable[[str], list[dict[str, Any]]]) -> tuple[list[Axis], dict[str, Any]]:
    """Axes for the template's selects and the JSON payload for report.js."""
    axes, values = build_axes(images)
    positions = {axis: {v: i for i, v in enumerate(vs)} for axis, vs in values.items()}
    x, y = default_xy(values)
    records = [image_record(row, positions, src, metrics_for(row["image_id"]))
               for row, src in zip(images, srcs)]
    payload = {
        "axes": [{"name": a.name, "label": a.label, "values": [v.label for v in a.values],
                  "titles": [v.title for v in a.values]} for a in axes],
        "defaults": {"x": x, "y": y, "z": ""},
        "images": records,
    }
    return axes, payload


def script_json(payload: Any) -> str:
    """JSON safe inside <script type="application/json">: no `</`, `<!--` or `]]>` can appear."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))
