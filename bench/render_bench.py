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
from tasks.models.base_model import load_pipeline
from tasks.models.pipeline_pool import release_idle_pipelines
from tasks.render.job import ADAPTER, PRECISIONS, render_job
from tasks.sweep.cells import grid_cells
from tasks.sweep.devices import resolve_precision, torch_device
from tasks.sweep.plan import RenderJobSpec

SUITE = "render"
SCALES = (1, 4, 16)


def bench_render(job: RenderJobSpec, scratch: Path, *, repeats: int) -> list[Row]:
    """Rows: images/s of ours, the notebook loop and the bare call; our overhead at 1x and 4x the cells; memory.

    Ours and the bare call are timed next to each other in every repeat, in alternating order, so load that
    drifts on a shared machine falls on both; memory is measured on separate, untimed calls (its sampling
    thread would otherwise be timed with ours alone)."""
    device = torch_device()
    times = paired_overhead(job, scratch, repeats=repeats) | {"cold": [], "notebook": []}
    for r in range(repeats):
        release_idle_pipelines()
        times["cold"].append(timed(lambda d=f"cold-{r}": render_job(_fresh(job, scratch / d)), cuda_sync))
        times["notebook"].append(timed(lambda d=f"notebook-{r}": notebook_render(job, scratch / d, device), cuda_sync))
    memory = {"ours": _peak_memory(lambda: render_job(_fresh(job, scratch / "memory-ours"))),
              "notebook": _peak_memory(lambda: notebook_render(job, scratch / "memory-notebook", device))}
    images = len(grid_cells(job))
    shape = f"{images} images: {_grid_text(job)}"
    per_s = {k: [images / t for t in v] for k, v in times.items()}
    unit, note = ("MiB", "torch.cuda.max_memory_allocated") if device == "cuda" else (
        "MiB", "process RSS peak during one untimed call (psutil)")
    return [
        rate_row(SUITE, "ours, cold: render_job loading the pipeline", images, times["cold"], "images/s", shape),
        rate_row(SUITE, "notebook: load pipeline + LoRA per image, batch 1", images, times["notebook"],
                 "images/s", shape),
        *overhead_rows(SUITE, "", job, times),
        ratio_row(SUITE, "ours / notebook images/s", per_s["ours"], per_s["notebook"], "median of per-repeat ratios"),
        ratio_row(SUITE, "bare / ours cold images/s", per_s["bare"], per_s["cold"],
                  "a process's first render job: the pipeline load on top"),
        Row("memory", "render ours: peak memory", unit, (memory["ours"],), note),
        Row("memory", "render notebook: peak memory", unit, (memory["notebook"],), note),
    ]


def paired_overhead(job: RenderJobSpec, scratch: Path, *, repeats: int) -> dict[str, list[float]]:
    """Seconds of `render_job` ("ours") and of the bare batched calls ("bare") for the job and for 4x its
    cells ("ours 4x", "bare 4x"): each pair timed next to each other, in alternating order."""
    pipe = _loaded_pipeline(job, torch_device())
    larger = _scaled(job, 4)
    cases = [("", job, bare_batched_render(pipe, job)), (" 4x", larger, bare_batched_render(pipe, larger))]
    for _, _, bare in cases:
        bare()  # first-call costs (allocations, lazy imports, kernel choice) would otherwise land on one variant
    render_job(_fresh(job, scratch / "warmup"))  # and fills the model-hash cache, as a sweep's first job does
    times: dict[str, list[float]] = {name: [] for name in ("ours", "bare", "ours 4x", "bare 4x")}
    for r in range(repeats):
        for label, measured, bare in cases:
            pair = [("ours", lambda m=measured, d=f"ours{label}-{r}": render_job(_fresh(m, scratch / d))),
                    ("bare", bare)]
            for name, call in pair if r % 2 == 0 else pair[::-1]:
                times[name + label].append(timed(call, cuda_sync))
    del pipe
    return times


def overhead_rows(suite: str, prefix: str, job: RenderJobSpec, times: dict[str, list[float]]) -> list[Row]:
    """Images/s of ours and bare at 1x and 4x the cells, and bare / ours (our overhead) at each."""
    larger = _scaled(job, 4)
    images, images_4x = len(grid_cells(job)), len(grid_cells(larger))
    shape, shape_4x = f"{images} images: {_grid_text(job)}", f"{images_4x} images: {_grid_text(larger)}"
    per_s = {k: [(images_4x if k.endswith("4x") else images) / t for t in v] for k, v in times.items()}
    return [
        rate_row(suite, f"{prefix}ours: render_job (pooled pipeline, batched)", images, times["ours"], "images/s",
                 shape),
        rate_row(suite, f"{prefix}bare: pipe() batched, all loaded, no I/O", images, times["bare"], "images/s", shape),
        rate_row(suite, f"{prefix}ours at 4x cells", images_4x, times["ours 4x"], "images/s", shape_4x),
        rate_row(suite, f"{prefix}bare at 4x cells", images_4x, times["bare 4x"], "images/s", shape_4x),
        ratio_row(suite, f"{prefix}bare / ours images/s (our overhead)", per_s["bare"], per_s["ours"],
                  "1.0 = no overhead; ours includes the LoRA swap, PNG, grid and Parquet writes; pairs timed "
                  "next to each other, order alternating"),
        ratio_row(suite, f"{prefix}bare / ours images/s at 4x cells", per_s["bare 4x"], per_s["ours 4x"],
                  "4 LoRA weights x the same prompts and seeds: 4 pipeline calls of the same batch size"),
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
    dtype = PRECISIONS[resolve_precision(job.precision, device)]  # the render task's own (fp16 on CUDA by default)
    pipe = load_pipeline(job.base_model_path, config=job.base_model.config, device=device, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(job.checkpoint.lora_dir, weight_name=DIFFUSERS_FILE, adapter_name=ADAPTER)
    return pipe


def _peak_memory(fn) -> float:
    """The peak memory (GPU allocated, else process RSS) of one call of `fn`, in MiB."""
    with PeakRss() as rss, PeakCudaMemory() as gpu:
        fn()
        cuda_sync()
    return gpu.peak_mb if torch.cuda.is_available() else rss.peak_mb


def _grid_text(job: RenderJobSpec) -> str:
    return (f"{len(job.prompts)} prompts x {len(job.seeds)} seeds x {len(job.lora_weights)} weights, "
            f"{'/'.join(job.samplers)} {'/'.join(map(str, job.steps))} steps, {job.width} px")
