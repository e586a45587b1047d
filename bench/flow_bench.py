"""Orchestration overhead: the demo sweep run through the Prefect flow against the sum of its compute.

Compute is what the catalog records: training loop time (runs.wall_time_s) plus render time
(images.render_s). The rest of the flow's wall time is ours and Prefect's: child process start
and model loading, scoring, Parquet, catalog, report, task scheduling. A re-run of the finished
sweep does no compute at all, so its wall time is pure overhead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

from bench.measure import PeakRss, Row, ratio_row

SUITE = "flow"
REPO = Path(__file__).resolve().parent.parent
DEMO_SPEC = REPO / "sweeps" / "demo.toml"


def bench_flow(scratch: Path, *, quick: bool, harness: bool = True, import_repeats: int = 3) -> list[Row]:
    """Rows: flow wall time, compute sums, their ratio, a no-op re-run, Prefect start-up, child imports."""
    spec_path = write_sweep(scratch, quick=quick)
    _prebuild_inputs(spec_path)  # builtin model + dataset: a one-off cost, not orchestration
    start = time.perf_counter()
    with _harness(harness):
        harness_s = time.perf_counter() - start
        with PeakRss(interval=0.1, children=True) as rss:
            wall, summary = _run_flow(spec_path)
        rerun, _ = _run_flow(spec_path)
    train_s, render_s, runs, images = compute_totals(Path(summary["sweep_root"]))
    what = f"{'reduced' if quick else 'sweeps/demo.toml'}: {runs} runs, {images} images"
    rows = [
        Row(SUITE, "flow wall time", "s", (wall,), what),
        Row(SUITE, "compute: training loops (sum runs.wall_time_s)", "s", (train_s,), what),
        Row(SUITE, "compute: renders (sum images.render_s)", "s", (render_s,), what),
        ratio_row(SUITE, "flow wall / compute", [wall], [train_s + render_s],
                  "< 1 when the 2 task threads overlap compute; rest: child start, loads, scoring, report"),
        Row(SUITE, "re-run of the finished sweep (all skipped)", "s", (rerun,), "pure orchestration"),
        Row(SUITE, "child process start: python -c 'import tasks.train.run'", "s",
            tuple(_import_seconds() for _ in range(import_repeats)), "paid once per training run"),
        Row("memory", "flow peak memory (process + children)", "MiB", (rss.peak_mb,), "process RSS, psutil"),
    ]
    if harness:
        rows.append(Row(SUITE, "Prefect test harness start", "s", (harness_s,), "temporary server, once"))
    return rows


def write_sweep(folder: Path, *, quick: bool) -> Path:
    """The demo spec writing into `folder`; `quick` shrinks it to one short run and a small grid."""
    data = tomllib.loads(DEMO_SPEC.read_text())
    data["output_dir"] = str(folder / "out")
    if quick:
        data["training"].update(ranks=[4], max_steps=4, checkpoint_steps=[4])
        data["render"].update(prompts=data["render"]["prompts"][:1], seeds=[1], samplers=["Euler a"], steps=[2],
                              lora_weights=[0.0, 1.0])
    path = folder / "sweep.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(data))
    if tomllib.loads(path.read_text()) != data:
        raise AssertionError(f"{path}: the written TOML does not read back as the spec")
    return path


def toml_text(data: dict, prefix: str = "") -> str:
    """TOML for a parsed sweep spec: scalars and lists, tables, and arrays of tables."""
    lines = [f"[{prefix}]"] if prefix else []
    lines += [f"{k} = {_value(v)}" for k, v in data.items() if not _is_table(v)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(toml_text(value, f"{prefix}.{key}" if prefix else key))
        elif _is_table(value):
            for item in value:
                lines += [f"[[{key}]]", *(f"{k} = {_value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"


def _is_table(value: object) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and bool(value) and isinstance(value[0], dict))


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(i) for i in v) + "]"
    return repr(v)


def compute_totals(sweep_root: Path) -> tuple[float, float, int, int]:
    """Training and render seconds, run and image counts, read from the sweep's DuckDB catalog."""
    from storage.catalog import connect
    from storage.layout import SweepLayout

    with connect(SweepLayout(sweep_root)) as con:
        train_s, runs = con.execute("SELECT sum(wall_time_s), count(*) FROM runs").fetchone()
        render_s, images = con.execute("SELECT sum(render_s), count(*) FROM images").fetchone()
    return float(train_s), float(render_s), int(runs), int(images)


def _prebuild_inputs(spec_path: Path) -> None:
    from tasks.preflight import prepare_inputs
    from tasks.sweep.load import load_spec

    with contextlib.redirect_stdout(sys.stderr):  # its dataset summary would land inside the table
        prepare_inputs(load_spec(spec_path))


def _run_flow(spec_path: Path) -> tuple[float, dict]:
    from flows.lora_sweep import lora_sweep

    start = time.perf_counter()
    state = lora_sweep(spec_path=str(spec_path), return_state=True)
    wall = time.perf_counter() - start
    if not state.is_completed():
        raise RuntimeError(f"the benchmark sweep did not complete: {state.message}")
    return wall, state.result()


@contextlib.contextmanager
def _harness(start: bool) -> Iterator[None]:
    """A temporary Prefect server (PREFECT_HOME in a temp folder); SIGTERM still shuts it down."""
    if not start:
        yield
        return
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    from prefect.testing.utilities import prefect_test_harness

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _import_seconds() -> float:
    """Wall time of a fresh interpreter importing the training module, as each training child does."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import tasks.train.run"], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start
