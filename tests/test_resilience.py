"""Nothing lost: a killed sweep resumes without recomputing finished work, and one failing run
is recorded as data while every other run completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
from safetensors.torch import load_file, save_file

from tests.conftest import small_sweep_data, write_spec

REPO = Path(__file__).resolve().parent.parent


def start_flow(spec_path: Path) -> subprocess.Popen:
    """The flow in its own process group, talking to the test harness's server."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONUNBUFFERED": "1"}
    code = f"from flows.lora_sweep import lora_sweep; lora_sweep(spec_path={str(spec_path)!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(process: subprocess.Popen, condition, timeout: float = 300) -> None:
    """SIGKILL the flow's whole process group as soon as `condition()` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the flow ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def snapshot(root: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.glob(pattern) if p.is_file()}


def test_killed_sweep_resumes_without_recomputing_anything(prefect_harness, tmp_path: Path) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out", ranks=[2, 4], max_steps=40, checkpoint_steps=[10, 20, 30, 40])
    data["render"].update(steps=[4], lora_weights=[0.0, 1.0])
    spec_path = write_spec(tmp_path, data)
    root = tmp_path / "out" / "small"
    checkpoints = "runs/*/checkpoints/step-*/*"
    lora_images = "images/tiny-sd15-r*/*.png"

    kill_when(start_flow(spec_path), lambda: any(root.glob("runs/*/checkpoints/step-000010/training_state.pt")))
    before_first = snapshot(root, checkpoints)
    assert before_first, "no checkpoint was complete at the first kill"

    kill_when(start_flow(spec_path), lambda: len(list(root.glob(lora_images))) >= 3)
    after_second = snapshot(root, checkpoints)
    images_before = snapshot(root, lora_images)
    assert {p: after_second[p] for p in before_first} == before_first  # resumed, not retrained

    summary = lora_sweep(spec_path=str(spec_path))
    assert summary["failures"] == []
    assert {p: p.stat().st_mtime_ns for p in after_second} == after_second
    assert {p: p.stat().st_mtime_ns for p in images_before} == images_before

    for parquet in root.glob("tables/*/*.parquet"):
        pq.read_metadata(parquet)  # every visible file is complete
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        grid = con.execute("SELECT count(*) FROM grid").fetchone()[0]
        ckpts = con.execute("SELECT count(*) FROM checkpoints").fetchone()[0]
        losses = con.execute("SELECT count(*), count(DISTINCT (run_id, step)) FROM losses").fetchone()
    assert grid == 2 * 4 * 2 * 1 * 2 * 1 * 1 * 2  # ranks x checkpoints x samplers x steps x weights x cfg x prompts x seeds
    assert ckpts == 8
    assert losses == (80, 80)


def broken_model(tmp_path: Path, source: Path) -> Path:
    """A copy of the tiny model whose UNet holds NaN weights: it loads, but training cannot work."""
    import shutil

    target = tmp_path / "broken-model"
    shutil.copytree(source, target)
    weights = next((target / "unet").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[name] = tensors[name] * float("nan")
    save_file(tensors, str(weights))
    return target


def test_one_failing_run_is_recorded_and_the_rest_completes(prefect_harness, tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out", ranks=[2], max_steps=4, checkpoint_steps=[4])
    data["base_models"].append({"name": "broken", "path": str(broken_model(tmp_path, tiny_model_dir))})
    data["render"].update(steps=[2], samplers=["Euler a"])
    state = lora_sweep(spec_path=str(write_spec(tmp_path, data)), return_state=True)

    assert state.is_failed()
    assert "training broken-r2" in state.message and "loss became nan" in state.message
    root = tmp_path / "out" / "small"
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        runs = dict(con.execute("SELECT base_model, status FROM runs").fetchall())
        error = con.execute("SELECT error FROM runs WHERE status = 'failed'").fetchone()[0]
        good_images = con.execute("SELECT count(*) FROM grid WHERE base_model = 'tiny-sd15'").fetchone()[0]
    assert runs == {"tiny-sd15": "completed", "broken": "failed"}
    assert "FloatingPointError" in error and "learning_rate" in error
    assert good_images == 1 * 1 * 1 * 2 * 2  # checkpoints x samplers x steps x weights x seeds
    report = (root / "report" / "index.html").read_text()
    assert "loss became nan" in report
