"""Training steps/s on the tiny model at 64 px: `tasks.train.run.fit_lora` with and without its
encoding cache, against a notebook loop; and the encoding time with a cold and a warm disk cache.

All run the same run spec (rank, batch, optimizer) on a freshly loaded pipeline, alternating
repeat by repeat. Steps/s is 1 / the median step time after the warm-up steps: model loading,
adapter creation and our one-off dataset encoding are excluded, and a step slowed by another job
on a shared machine does not move the median. The encoding rows time `encode_training_set` alone.
"""

from __future__ import annotations

import shutil
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from bench.measure import PeakCudaMemory, PeakRss, Row, cuda_sync, rate_row, ratio_row, timed
from bench.naive import notebook_train
from bench.workspace import Workspace
from tasks.data.dataset import DatasetItem, crop_sizes, scan_dataset
from tasks.models.base_model import load_pipeline
from tasks.models.text_conditioning import text_encoders
from tasks.sweep.devices import torch_device
from tasks.sweep.plan import TrainingRunSpec
from tasks.train.encodings import encode_training_set
from tasks.train.loop import fit_lora

SUITE = "train"


def bench_training(ws: Workspace, *, warmup: int, steps: int, repeats: int) -> list[Row]:
    """Rows: steps/s of ours and of the notebook loop, their ratio, and each one's peak memory."""
    device = torch_device()
    # fit_lora calls on_checkpoint at every checkpoint step: make every step one to read the clock.
    run = ws.run.model_copy(update={"max_steps": warmup + steps,
                                    "checkpoint_steps": tuple(range(warmup, warmup + steps + 1))})
    items = scan_dataset(Path(run.dataset_path), caption_extension=run.dataset.caption_extension)
    ours: list[float] = []
    uncached: list[float] = []
    naive: list[float] = []
    memory: dict[str, list[float]] = {"ours": [], "notebook": []}
    off = run.model_copy(update={"cache": "off", "cache_dir": None})
    for _ in range(repeats):
        seconds, mb = _measure(lambda marks: _run_ours(run, items, device, marks), run, device)
        ours.append(seconds)
        memory["ours"].append(mb)
        seconds, _ = _measure(lambda marks: _run_ours(off, items, device, marks), off, device)
        uncached.append(seconds)
        seconds, mb = _measure(lambda marks: _run_notebook(run, items, device, marks), run, device)
        naive.append(seconds)
        memory["notebook"].append(mb)
    cold, warm = _encoding_times(ws, run, items, device, repeats)
    shape = f"rank {run.rank}, batch {run.batch_size}, {run.resolution} px, {steps} steps after {warmup} warm-up"
    mem_unit, mem_note = _memory_label(device)
    return [
        rate_row(SUITE, "ours: fit_lora, cache on (latents + text encoded once)", steps, ours, "steps/s", shape),
        rate_row(SUITE, "ours: fit_lora, cache = 'off' (VAE + text encode every step)", steps, uncached, "steps/s",
                 shape),
        ratio_row(SUITE, "cache on / cache off steps/s", [steps / s for s in ours], [steps / s for s in uncached],
                  "median of per-repeat ratios; steps/s = 1 / median step time"),
        rate_row(SUITE, "notebook: VAE + text encode every step", steps, naive, "steps/s", shape),
        ratio_row(SUITE, "ours / notebook steps/s", [steps / s for s in ours], [steps / s for s in naive],
                  "median of per-repeat ratios; steps/s = 1 / median step time"),
        Row(SUITE, "encode dataset: cold disk cache", "s", tuple(cold),
            f"{len(items)} images + captions encoded and written, weights hashed"),
        Row(SUITE, "encode dataset: warm disk cache", "s", tuple(warm), "weights hashed, every entry read back"),
        Row("memory", "train ours: peak memory", mem_unit, tuple(memory["ours"]), mem_note),
        Row("memory", "train notebook: peak memory", mem_unit, tuple(memory["notebook"]), mem_note),
    ]


def _encoding_times(ws: Workspace, run: TrainingRunSpec, items: list[DatasetItem], device: str,
                    repeats: int) -> tuple[list[float], list[float]]:
    """Seconds `encode_training_set` takes with an empty cache folder, then again with it filled."""
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, device=device)
    encoders, tokenizers = text_encoders(pipe)
    sizes = crop_sizes(items, run.resolution)
    cold: list[float] = []
    warm: list[float] = []
    for repeat in range(repeats):
        folder = ws.root / "encoding-cache" / str(repeat)
        for times in (cold, warm):
            encode = partial(encode_training_set, items, sizes, pipe.vae, encoders, tokenizers,
                             torch.Generator().manual_seed(0), device, mode="disk", cache_dir=str(folder))
            times.append(timed(encode, cuda_sync))
        shutil.rmtree(folder)
    return cold, warm


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
    fit_lora(pipe, run, items, device=device,
             on_checkpoint=lambda step, *_: _mark(marks, step, run))


def _run_notebook(run: TrainingRunSpec, items: list[DatasetItem], device: str, marks: dict[int, float]) -> None:
    pipe = load_pipeline(run.base_model_path, config=run.base_model.config, device=device)
    notebook_train(pipe, run, items, device, on_step=lambda step: _mark(marks, step, run))


def _memory_label(device: str) -> tuple[str, str]:
    if device == "cuda":
        return "MiB", "torch.cuda.max_memory_allocated"
    return "MiB", "process RSS peak during the call (psutil, sampled every 20 ms)"
