"""The Dask task runner computes exactly what the default thread runner computes.

One small sweep runs twice: on the flow's threads and on a Dask LocalCluster of two worker
processes. Every table row (keyed by its content id), every pixel and every LoRA weight must
be equal; the training must have happened outside the test process.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from tasks.train.claim import read_trainers
from tests.conftest import small_sweep_data, write_spec

# Two sweeps and a LocalCluster of 2 processes (~2 min on 2 cores): in `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

# Columns that say where or how long, not what: they differ between any two runs of a sweep.
VOLATILE = {"sweep_id", "path", "render_s", "run_dir", "base_model_path", "lora_path", "kohya_path",
            "wall_time_s", "steps_per_s", "peak_memory_mb", "started_at", "finished_at"}
KEYS = {"runs": "run_id", "checkpoints": "checkpoint_id", "losses": "run_id, step", "images": "image_id",
        "image_metrics": "image_id, metric, reference_id"}


def run_sweep(tmp: Path, name: str, execution: dict | None) -> dict:
    """Each sweep in its own output_dir: in one, the second would use the first one's runs and renders
    (same content ids, flows/shared_work.py) instead of computing them."""
    from flows.lora_sweep import lora_sweep

    (tmp / name).mkdir()
    data = small_sweep_data(tmp / name / "out", ranks=[4], checkpoint_steps=[6, 12])
    data["name"] = name
    data["render"].update(samplers=["Euler a"], steps=[2])
    if execution:
        data["execution"] = execution
    summary = lora_sweep(spec_path=str(write_spec(tmp / name, data)))
    assert summary["failures"] == []
    return summary


def rows(summary: dict, table: str) -> list[dict]:
    with duckdb.connect(str(Path(summary["sweep_root"]) / "catalog.duckdb"), read_only=True) as con:
        cursor = con.execute(f"SELECT * FROM {table} ORDER BY {KEYS[table]}")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, r)) for r in cursor.fetchall()]


def stable(table_rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in table_rows]


@pytest.fixture(scope="module")
def both(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    tmp = tmp_path_factory.mktemp("runners")
    threads = run_sweep(tmp, "threads", None)
    dask = run_sweep(tmp, "dask", {"runner": "dask", "n_workers": 2, "threads_per_worker": 1})
    return threads, dask


@pytest.mark.parametrize("table", list(KEYS))
def test_dask_gives_the_same_rows_as_threads(both, table: str) -> None:
    threads, dask = both
    expected = stable(rows(threads, table))
    assert expected, f"the threads sweep wrote no {table} rows"
    assert stable(rows(dask, table)) == expected


def test_dask_gives_the_same_pixels_and_lora_weights_as_threads(both) -> None:
    threads, dask = both
    images = {r["image_id"]: r["path"] for r in rows(threads, "images")}
    other = {r["image_id"]: r["path"] for r in rows(dask, "images")}
    assert other.keys() == images.keys() and len(images) == 2 + 2 * 2  # baseline + checkpoints x seeds
    for image_id, path in images.items():
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(other[image_id]))), image_id
    for ckpt in rows(threads, "checkpoints"):
        mine = load_file(ckpt["lora_path"])
        theirs = load_file(next(c["lora_path"] for c in rows(dask, "checkpoints")
                                if c["checkpoint_id"] == ckpt["checkpoint_id"]))
        assert mine.keys() == theirs.keys()
        assert all(np.array_equal(mine[k], theirs[k]) for k in mine)


def test_dask_trained_in_worker_processes_once_per_run(both) -> None:
    _, dask = both
    trainers = [t for d in sorted(Path(dask["sweep_root"], "runs").iterdir()) for t in read_trainers(d)]
    assert len(trainers) == 1  # one line per training attempt: the run trained exactly once
    assert all(t["pid"] != os.getpid() for t in trainers)
