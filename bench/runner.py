"""Run the selected suites at full or quick sizes, then print the table and write the results."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import Row
from bench.table import RunInfo, format_table, write_results
from tasks.sweep.devices import torch_device

CPU_SUITES = ("train", "render", "grid", "flow")
GPU_SUITES = ("gpu", "render-size")  # full-size UNets' throughput; the render task's overhead at SD1.5 512 px
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Options:
    """What to run: the parsed command line."""

    quick: bool = False
    suites: tuple[str, ...] = CPU_SUITES
    gpu: str | None = None  # "gpu" (CUDA, full-size UNets), "dry-run" (CPU, toy UNets) or None
    compile: bool = False
    peak_tflops: float | None = None
    threads: int | None = None
    out: str | None = None

    @property
    def mode(self) -> str:
        return ("quick" if self.quick else "full") + (f"+{self.gpu}" if self.gpu else "")


@dataclass(frozen=True)
class Sizes:
    """Steps, grid and repeat counts of the CPU suites."""

    train_warmup: int
    train_steps: int
    train_repeats: int
    render_steps: int
    render_prompts: int
    render_seeds: int
    render_repeats: int
    grid_repeats: int
    import_repeats: int


FULL = Sizes(train_warmup=5, train_steps=40, train_repeats=5, render_steps=20, render_prompts=2, render_seeds=4,
             render_repeats=7, grid_repeats=3, import_repeats=3)
QUICK = Sizes(train_warmup=2, train_steps=6, train_repeats=2, render_steps=2, render_prompts=1, render_seeds=2,
              render_repeats=2, grid_repeats=1, import_repeats=1)


def collect(options: Options, scratch: Path, *, harness: bool = True) -> list[Row]:
    """Run the selected suites in order; `harness=False` when a Prefect server is already configured."""
    sizes = QUICK if options.quick else FULL
    rows: list[Row] = []
    if {"train", "render", "grid"} & set(options.suites):
        rows += _workspace_suites(options, sizes, scratch / "workspace")
    if "flow" in options.suites:
        _say("flow: the demo sweep through Prefect" + (" (reduced)" if options.quick else ""))
        from bench.flow_bench import bench_flow

        rows += bench_flow(scratch / "flow", quick=options.quick, harness=harness,
                           import_repeats=sizes.import_repeats)
    if "gpu" in options.suites and options.gpu:
        _say(f"gpu: UNet throughput ({options.gpu})")
        from bench.gpu_bench import bench_gpu

        rows += bench_gpu(gpu_settings(options))
    if "render-size" in options.suites and options.gpu:
        _say(f"render-size: render_job vs bare batched calls at a real model's size ({options.gpu})")
        from bench.render_real_size import bench_render_real_size

        rows += bench_render_real_size(scratch / "render-size", dry_run=options.gpu == "dry-run",
                                       repeats=sizes.render_repeats)
    return rows


def _workspace_suites(options: Options, sizes: Sizes, root: Path) -> list[Row]:
    from bench.render_bench import bench_grid_scaling, bench_render
    from bench.train_bench import bench_training
    from bench.workspace import Workspace

    _say("setup: tiny model, demo dataset, one short training run")
    ws = Workspace.create(root, steps=sizes.render_steps)
    rows: list[Row] = []
    if "train" in options.suites:
        _say("train: fit_lora vs notebook loop")
        rows += bench_training(ws, warmup=sizes.train_warmup, steps=sizes.train_steps, repeats=sizes.train_repeats)
    if {"render", "grid"} & set(options.suites):
        job = ws.render_job(ws.trained_checkpoint())
        job = job.model_copy(update={"prompts": job.prompts[: sizes.render_prompts],
                                     "seeds": tuple(range(1, sizes.render_seeds + 1))})
        if "render" in options.suites:
            _say("render: render_job vs notebook loop vs bare batched call")
            rows += bench_render(job, root / "render", repeats=sizes.render_repeats)
        if "grid" in options.suites:
            _say("grid: render_job at 1x, 4x, 16x cells")
            rows += bench_grid_scaling(job, root / "grid", repeats=sizes.grid_repeats)
    return rows


def gpu_settings(options: Options):
    """GPU suite settings: CUDA with the card's peak, or a CPU dry run with a nominal 1 TFLOP/s."""
    import torch

    from bench.gpu_bench import GpuSettings
    from bench.gpu_models import peak_tflops

    if options.gpu == "dry-run":
        return GpuSettings(device="cpu", dry_run=True, peak_tflops=options.peak_tflops or 1.0,
                           compile=options.compile, compile_backend="eager", batch=2, warmup=1, iters=1,
                           repeats=2, train_steps=1)
    peak = options.peak_tflops or peak_tflops(torch.cuda.get_device_name())
    if peak is None:
        _say(f"gpu: no peak TFLOP/s known for {torch.cuda.get_device_name()!r}; pass --peak-tflops for the limit rows")
    return GpuSettings(device="cuda", dry_run=False, peak_tflops=peak, compile=options.compile,
                       iters=5 if options.quick else 10, repeats=2 if options.quick else 3)


def run_and_report(options: Options) -> list[Row]:
    """Measure, print the header and the table, write Parquet + latest.md, print where they went."""
    import torch

    _quiet_libraries()
    if options.threads:
        torch.set_num_threads(options.threads)
        os.environ["OMP_NUM_THREADS"] = str(options.threads)  # the flow's training child processes too
    device = torch_device()
    info = RunInfo.collect(options.mode, device)
    with tempfile.TemporaryDirectory(prefix="lora-sweep-bench-") as scratch:
        rows = collect(options, Path(scratch))
    print("\n".join(info.header()))
    print(format_table(rows))
    parquet, latest = write_results(rows, info, Path(options.out) if options.out else RESULTS_DIR)
    print(f"\nwrote {parquet} and {latest}")
    return rows


def _quiet_libraries() -> None:
    """Keep the terminal for the table: library warnings that repeat per pipeline load are not news here."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


_STARTED = time.perf_counter()


def _say(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)
