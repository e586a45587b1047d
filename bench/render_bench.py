"""Grid images/s: `tasks.render.job.render_job` against a notebook loop and one bare batched call.

Ours renders prompts x seeds in batches on the process's pooled pipeline (loaded by a sweep's first
render job; its LoRA layers swapped in place for the next checkpoint); "ours, cold" is a process's
first job, which loads the pipeline. The notebook loads pipeline and LoRA again for every image and
renders at batch 1; the bare call is diffusers alone with everything already loaded, so bare / ours
is what our bookkeeping (LoRA loading, PNG metadata, hashing, grids, Parquet rows) costs. Then how
render_job's time grows with the grid: 1x, 4x, 16x cells.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.measure import PeakCudaMemory, PeakRss, Row, cuda_sync, rate_row, ratio_row, timed
from bench.naive import bare_batched_render, notebook_render
from tasks.lora.files import DIFFUSERS_FILE
from tasks.models.pipeline_pool import release_idle_pipelines
from tasks.models.base_model import load_pipeline
from tasks.render.job import ADAPTER, render_job
from tasks.sweep.cells import grid_cells
from tasks.sweep.devices import torch_device
from tasks.sweep.plan import RenderJobSpec

SUITE = "render"
SCALES = (1, 4, 16)


def bench_render(job: RenderJobSpec, scratch: Path, *, repeats: int) -> list[Row]:
    """Rows: images/s of ours, the notebook loop and the bare call; ratios; peak memory."""
    device = torch_device()
    images = len(grid_cells(job))
    bare_call = bare_batched_render(_loaded_pipeline(job, device), job)
    bare_call()  # first-call costs (allocations, lazy imports) would otherwise land on one variant
    render_job(_fresh(job, scratch / "warmup"))  # and fills the model-hash cache, as a sweep's first job does
    times: dict[str, list[float]] = {"ours": [], "cold": [], "notebook": [], "bare": []}
    memory: dict[str, list[float]] = {"ours": [], "notebook": []}
    for r in range(repeats):
        times["ours"].append(_with_memory(lambda: render_job(_fresh(job, scratch / f"ours-{r}")), memory["ours"]))
        release_idle_pipelines()
        times["cold"].append(timed(lambda: render_job(_fresh(job, scratch / f"cold-{r}")), cuda_sync))
        times["notebook"].append(_with_memory(lambda: notebook_render(job, scratch / f"notebook-{r}", device),
                                              memory["notebook"]))
        times["bare"].append(timed(bare_call, cuda_sync))
    shape = f"{images} images: {_grid_text(job)}"
    unit, note = ("MiB", "torch.cuda.max_memory_allocated") if device == "cuda" else (
        "MiB", "process RSS peak during the call (psutil)")
    per_s = {k: [images / t for t in v] for k, v in times.items()}
    return [
        rate_row(SUITE, "ours: render_job (pooled pipeline, batched)", images, times["ours"], "images/s", shape),
        rate_row(SUITE, "ours, cold: render_job loading the pipeline", images, times["cold"], "images/s", shape),
        rate_row(SUITE, "notebook: load pipeline + LoRA per image, batch 1", images, times["notebook"],
                 "images/s", shape),
        rate_row(SUITE, "bare: pipe() batched, all loaded, no I/O", images, times["bare"], "images/s", shape),
        ratio_row(SUITE, "ours / notebook images/s", per_s["ours"], per_s["notebook"], "median of per-repeat ratios"),
        ratio_row(SUITE, "bare / ours images/s (our overhead)", per_s["bare"], per_s["ours"],
                  "1.0 = no overhead; ours includes the LoRA load, PNG, grid and Parquet writes"),
        ratio_row(SUITE, "bare / ours cold images/s", per_s["bare"], per_s["cold"],
                  "a process's first render job: the pipeline load on top"),
        Row("memory", "render ours: peak memory", unit, tuple(memory["ours"]), note),
        Row("memory", "render notebook: peak memory", unit, tuple(memory["notebook"]), note),
    ]


def bench_grid_scaling(job: RenderJobSpec, scratch: Path, *, repeats: int) -> list[Row]:
    """Rows: render_job seconds and images/s at 1x, 4x and 16x the cells, and time ratios to 1x."""
    jobs = {scale: _scaled(job, scale) for scale in SCALES}
    seconds: dict[int, list[float]] = {scale: [] for scale in SCALES}
    for r in range(repeats):
        for scale, scaled in jobs.items():
            seconds[scale].append(timed(lambda: render_job(_fresh(scaled, scratch / f"x{scale}-{r}")), cuda_sync))
    rows = []
    for scale, scaled in jobs.items():
        images = len(grid_cells(scaled))
        what = f"{images} images: {_grid_text(scaled)}"
        rows.append(Row("grid", f"render_job {scale}x cells: wall time", "s", tuple(seconds[scale]), what))
        rows.append(rate_row("grid", f"render_job {scale}x cells: images/s", images, seconds[scale], "images/s"))
    for scale in SCALES[1:]:
        rows.append(ratio_row("grid", f"time {scale}x / 1x", seconds[scale], seconds[1],
                              f"{scale} = linear; less = fixed costs amortised"))
    return rows


def _scaled(job: RenderJobSpec, scale: int) -> RenderJobSpec:
    """The job with `scale` times the cells: more LoRA weights (4x), then more seeds (16x)."""
    if scale not in SCALES or len(job.lora_weights) != 1:
        raise ValueError(f"grid scale {scale}: supported scales are {SCALES}, from a job with one LoRA weight")
    if scale == 1:
        return job
    seeds = job.seeds if scale == 4 else tuple(range(1, 4 * len(job.seeds) + 1))
    return job.model_copy(update={"lora_weights": (0.25, 0.5, 0.75, 1.0), "seeds": seeds})


def _fresh(job: RenderJobSpec, root: Path) -> RenderJobSpec:
    """The same job writing into an empty sweep folder, so nothing is found on disk and skipped."""
    return job.model_copy(update={"sweep_root": str(root)})


def _loaded_pipeline(job: RenderJobSpec, device: str):
    assert job.checkpoint is not None, "the render benchmark needs a LoRA checkpoint"
    pipe = load_pipeline(job.base_model_path, config=job.base_model.config, device=device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(job.checkpoint.lora_dir, weight_name=DIFFUSERS_FILE, adapter_name=ADAPTER)
    return pipe


def _with_memory(fn, peaks: list[float]) -> float:
    """Seconds `fn` takes; appends its peak memory (GPU allocated, else process RSS) to `peaks`."""
    with PeakRss() as rss, PeakCudaMemory() as gpu:
        seconds = timed(fn, cuda_sync)
    peaks.append(gpu.peak_mb if torch.cuda.is_available() else rss.peak_mb)
    return seconds


def _grid_text(job: RenderJobSpec) -> str:
    return (f"{len(job.prompts)} prompts x {len(job.seeds)} seeds x {len(job.lora_weights)} weights, "
            f"{'/'.join(job.samplers)} {'/'.join(map(str, job.steps))} steps, {job.width} px")
