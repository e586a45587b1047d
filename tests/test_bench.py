"""Smoke test of `python -m bench` at quick sizes: every row is there and every figure is finite and
positive. No timing thresholds: these machines are shared, so speed is reported, never asserted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from bench.__main__ import main, parse_args
from bench.runner import Options, collect
from bench.table import RunInfo, format_table, write_results

TRAIN = ["ours: fit_lora, cache on (latents + text encoded once)",
         "ours: fit_lora, cache = 'off' (VAE + text encode every step)", "cache on / cache off steps/s",
         "notebook: VAE + text encode every step", "ours / notebook steps/s", "encode dataset: cold disk cache",
         "encode dataset: warm disk cache"]
RENDER = ["ours: render_job (pooled pipeline, batched)", "ours, cold: render_job loading the pipeline",
          "notebook: load pipeline + LoRA per image, batch 1", "bare: pipe() batched, all loaded, no I/O",
          "ours at 4x cells", "bare at 4x cells", "ours / notebook images/s", "bare / ours images/s (our overhead)",
          "bare / ours images/s at 4x cells", "bare / ours cold images/s"]
GRID = [f"render_job {k}x cells: {what}" for k in (1, 4, 16) for what in ("wall time", "images/s")] + [
    "time 4x / 1x", "time 16x / 1x"]
FLOW = ["flow wall time", "compute: training loops (sum runs.wall_time_s)", "compute: renders (sum images.render_s)",
        "flow wall / compute", "re-run of the finished sweep (all skipped)",
        "child process start: python -c 'import tasks.train.run'"]
MEMORY = ["train ours: peak memory", "train notebook: peak memory", "render ours: peak memory",
          "render notebook: peak memory", "flow peak memory (process + children)"]


def gpu_rows(label: str, *, reference: bool) -> list[tuple[str, str]]:
    """The GPU suite's rows for one toy case of a dry run (batch 2; compiled only for the reference case)."""
    variants = ["fp16 SDPA b1", "fp16 SDPA b2", "fp16 SDPA channels_last b1", "fp16 classic attention (no SDPA) b1",
                "fp16 + LoRA r16 unfused b1", "fp16 + LoRA r16 fused b1", "bf16 SDPA b1", "fp32 SDPA b1"]
    variants += ["fp16 SDPA torch.compile b1"] if reference else []
    rows = [("gpu", f"{label} render {v}") for v in variants]
    rows += [("gpu", f"{label} {n}") for n in (
        "UNet FLOPs per it (CFG: 2 latents)", "render FLOP-bound limit", "render best b1 / FLOP-bound limit",
        "render fp16 SDPA b2 / FLOP-bound limit", "train LoRA r16 bf16 autocast b1", "train LoRA r16 fp32 b1",
        "train FLOP-bound limit", "train bf16 / FLOP-bound limit")]
    rows += [("memory", f"{label} {n}: peak memory") for n in ("render b2", "train bf16 autocast", "train fp32")]
    if reference:
        rows += [("gpu", f"{label} render fp16 SDPA b1 / published {name}")
                 for name in ("plain diffusers (54 it/s)", "stable-fast (105 it/s)")]
    return rows


RENDER_SIZE = [f"tiny-sd15 64px {n}" for n in (
    "ours: render_job (pooled pipeline, batched)", "bare: pipe() batched, all loaded, no I/O", "ours at 4x cells",
    "bare at 4x cells", "bare / ours images/s (our overhead)", "bare / ours images/s at 4x cells")]
EXPECTED = {("train", n) for n in TRAIN} | {("render", n) for n in RENDER} | {("grid", n) for n in GRID} | {
    ("render-size", n) for n in RENDER_SIZE} | {
    ("memory", n) for n in MEMORY[:4]} | set(gpu_rows("toy-sd15 32px", reference=True)) | set(
    gpu_rows("toy-sdxl 64px", reference=False))
EXPECTED_FLOW = {("flow", n) for n in FLOW} | {("memory", MEMORY[4]), ("flow", "Prefect test harness start")}


def assert_rows(rows: list, expected: set[tuple[str, str]]) -> None:
    """Exactly the expected rows, once each, every repeat and median finite and positive."""
    assert {(r.suite, r.name) for r in rows} == expected
    assert len(rows) == len(expected), "a row appears twice"
    bad = [(r.name, r.samples) for r in rows
           if not r.samples or not all(math.isfinite(x) and x > 0 for x in (*r.samples, r.value))]
    assert bad == []


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory: pytest.TempPathFactory):
    """The in-process suites at quick sizes, the GPU suite as a CPU dry run with torch.compile (eager)."""
    import torch

    options = Options(quick=True, suites=("train", "render", "grid", "gpu", "render-size"), gpu="dry-run",
                      compile=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine run ~10x slower (OpenMP barriers)
    try:
        yield collect(options, tmp_path_factory.mktemp("bench"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # the quick bench takes ~50 s on 2 cores: in `make test-slow`, which CI runs too
def test_quick_run_has_every_row_with_finite_positive_figures(quick_rows) -> None:
    assert_rows(quick_rows, EXPECTED)


@pytest.mark.slow
def test_quick_flow_suite_has_every_row(tmp_path: Path) -> None:
    """The flow suite starts its own Prefect harness and a training child process: about a minute, so opt-in."""
    rows = collect(Options(quick=True, suites=("flow",)), tmp_path)
    assert_rows(rows, EXPECTED_FLOW)


def test_reduced_demo_spec_round_trips_through_toml(tmp_path: Path) -> None:
    from bench.flow_bench import write_sweep
    from tasks.sweep.load import load_spec

    spec = load_spec(write_sweep(tmp_path, quick=True))
    assert spec.training.ranks == (4,) and spec.render.lora_weights == (0.0, 1.0)
    assert spec.output_dir == str(tmp_path / "out")


@pytest.mark.slow
def test_table_and_result_files_hold_every_row(quick_rows, tmp_path: Path) -> None:
    info = RunInfo.collect("quick+dry-run", "cpu")
    table = format_table(quick_rows)
    assert all(r.name in table for r in quick_rows)
    parquet, latest = write_results(quick_rows, info, tmp_path)
    written = pq.read_table(parquet).to_pylist()
    assert [(w["suite"], w["name"], w["value"]) for w in written] == [(r.suite, r.name, r.value) for r in quick_rows]
    assert all(w["load_1m"] >= 0 and w["git_sha"] is not None for w in written)
    assert latest.read_text().count("\n| ") == len(quick_rows) + 1  # header row + one per figure


def test_gpu_mode_without_cuda_exits_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --gpu would run")
    assert main(["--gpu", "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "--gpu needs CUDA" in err and "--gpu-dry-run" in err


def test_bad_options_are_reported_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--compile", "--only", "train,gpu", "--threads", "0"])
    err = capsys.readouterr().err
    assert "--compile applies to the GPU suite" in err and "unknown suite(s) ['gpu']" in err and "--threads 0" in err
