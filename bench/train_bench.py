"""Training steps/s on the tiny model at 64 px: `tasks.train.fit_lora` against a notebook loop.

Both run the same run spec (rank, batch, optimizer) on a freshly loaded pipeline, alternating
repeat by repeat. Steps/s is 1 / the median step time after the warm-up steps: model loading,
adapter creation and our one-off dataset encoding are excluded from both, and a step slowed by
another job on a shared machine does not move the median.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from bench.measure import PeakCudaMemory, PeakRss, Row, cuda_sync, rate_row, ratio_row
from bench.naive import notebook_train
from bench.workspace import Workspace
from tasks.base_model import load_pipeline
from tasks.dataset import DatasetItem, scan_dataset
from tasks.plan import TrainingRunSpec
from tasks.train import fit_lora

SUITE = "train"


def bench_training(ws: Workspace, *, warmup: int, steps: int, repeats: int) -> list[Row]:
    """Rows: steps/s of ours and of the notebook loop, their ratio, and each one's peak memory."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fit_lora calls on_checkpoint at every checkpoint step: make every step one to read the clock.
    run = ws.run.model_copy(update={"max_steps": warmup + steps,
                                    "checkpoint_steps": tuple(range(warmup, warmup + steps + 1))})
    items = scan_dataset(Path(run.dataset_path), caption_extension=run.dataset.caption_extension)
    ours: list[float] = []
    naive: list[float] = []
    memory: dict[str, list[float]] = {"ours": [], "notebook": []}
    for _ in range(repeats):
        seconds, mb = _measure(lambda marks: _run_ours(run, items, device, marks), run, device)
        ours.append(seconds)
        memory["ours"].append(mb)
        seconds, mb = _measure(lambda marks: _run_notebook(run, items, device, marks), run, device)
        naive.append(seconds)
        memory["notebook"].append(mb)
    shape = f"rank {run.rank}, batch {run.batch_size}, {run.resolution} px, {steps} steps after {warmup} warm-up"
    mem_unit, mem_note = _memory_label(device)
    return [
        rate_row(SUITE, "ours: fit_lora (latents + text cached once)", steps, ours, "steps/s", shape),
        rate_row(SUITE, "notebook: VAE + text encode every step", steps, naive, "steps/s", shape),
        ratio_row(SUITE, "ours / notebook steps/s", [steps / s for s in ours], [steps / s for s in naive],
                  "median of per-repeat ratios; steps/s = 1 / median step time"),
        Row("memory", "train ours: peak memory", mem_unit, tuple(memory["ours"]), mem_note),
        Row("memory", "train notebook: peak memory", mem_unit, tuple(memory["notebook"]), mem_note),
    ]


def _measure(train, run: TrainingRunSpec, device: str) -> tuple[float, float]:
    """Seconds for `steps` steps at the median step time, and the peak memory of the whole call."""
    marks: dict[int, float] = {}
    with PeakRss() as rss, PeakCudaMemory() as gpu:
        train(marks)
    clock = [marks[s] for s in run.checkpoint_steps]
    step_times = [b - a for a, b in zip(clock, clock[1:])]
    return statistics.median(step_times) * len(step_times), gpu.peak_mb if device == "cuda" else rss.peak_mb


def _mark(marks: dict[int, float], step: int, run: TrainingRunSpec) -> None:
    if step in run.checkpoint_steps:
        cuda_sync()
        marks[step] = time.perf_counter()


def _run_ours(run: TrainingRunSpec, items: list[DatasetItem], device: str, marks: dict[int, float]) -> None:
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, device=device)
    fit_lora(pipe, run, items, device=device, losses=[],
             on_checkpoint=lambda step, *_: _mark(marks, step, run))


def _run_notebook(run: TrainingRunSpec, items: list[DatasetItem], device: str, marks: dict[int, float]) -> None:
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, device=device)
    notebook_train(pipe, run, items, device, on_step=lambda step: _mark(marks, step, run))


def _memory_label(device: str) -> tuple[str, str]:
    if device == "cuda":
        return "MiB", "torch.cuda.max_memory_allocated"
    return "MiB", "process RSS peak during the call (psutil, sampled every 20 ms)"
