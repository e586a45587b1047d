"""The benchmark's outputs: a printed table, `results/<timestamp>.parquet` and `results/latest.md`.

Every row carries the run's provenance (versions, git sha, host, device, threads) and the load
average when it was measured, so figures from shared machines can be judged later.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.measure import Row

COLUMNS = ("suite", "measurement", "median", "unit", "n", "spread", "load 1m", "note")


@dataclass(frozen=True)
class RunInfo:
    """Where and how the benchmark ran."""

    started: datetime
    mode: str
    device: str
    device_name: str
    torch_threads: int
    load_start: tuple[float, float, float]

    @classmethod
    def collect(cls, mode: str, device: str) -> RunInfo:
        import torch

        name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
        return cls(datetime.now(timezone.utc), mode, device, name, torch.get_num_threads(), os.getloadavg())

    def header(self) -> list[str]:
        from tasks.sweep.provenance import git_sha, package_versions

        v = package_versions()
        load_end = os.getloadavg()
        return [
            f"lora-sweep bench, {self.mode} mode, {self.started:%Y-%m-%d %H:%M:%S} UTC, git {git_sha()}",
            f"host {platform.node()}: {os.cpu_count()} CPUs, device {self.device} ({self.device_name}), "
            f"torch {v['torch']} ({self.torch_threads} threads), diffusers {v['diffusers']}, peft {v['peft']}, "
            f"prefect {v['prefect']}",
            "load average 1/5/15 min: at start " + _load(self.load_start) + ", at end " + _load(load_end),
        ]


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table, one line per figure."""
    cells = [COLUMNS, *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_table(rows: list[Row], info: RunInfo) -> str:
    """latest.md: the run's header lines and the same table in Markdown."""
    head = [f"# Benchmark results ({info.mode})", "", *(f"- {line}" for line in info.header()), ""]
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(head + table) + "\n"


def write_results(rows: list[Row], info: RunInfo, out_dir: Path) -> tuple[Path, Path]:
    """Write `<timestamp>.parquet` (one row per figure) and `latest.md`; return both paths."""
    from tasks.sweep.provenance import git_sha, package_versions

    out_dir.mkdir(parents=True, exist_ok=True)
    shared = {"run_at": info.started, "mode": info.mode, "device": info.device, "device_name": info.device_name,
              "torch_threads": info.torch_threads, "cpu_count": os.cpu_count(), "host": platform.node(),
              "git_sha": git_sha(), "versions": json.dumps(package_versions(), sort_keys=True)}
    records = [{**shared, "suite": r.suite, "name": r.name, "value": r.value, "unit": r.unit, "n": len(r.samples),
                "spread": r.spread, "samples": list(r.samples), "note": r.note, "load_1m": r.load[0],
                "load_5m": r.load[1], "load_15m": r.load[2]} for r in rows]
    parquet = out_dir / f"{info.started:%Y%m%dT%H%M%SZ}-{info.mode}.parquet"
    tmp = parquet.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, parquet)
    latest = out_dir / "latest.md"
    latest.write_text(markdown_table(rows, info))
    return parquet, latest


def _cells(r: Row) -> tuple[str, ...]:
    spread = f"{100 * r.spread:.0f}%" if len(r.samples) > 1 else "-"
    return (r.suite, r.name, _number(r.value), r.unit, str(len(r.samples)), spread, f"{r.load[0]:.2f}", r.note)


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)
