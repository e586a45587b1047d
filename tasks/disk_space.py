"""Will the sweep's outputs fit? An estimate of the bytes it writes, checked against the free space.

The rule (docs/faults.md):
- checkpoints: every planned checkpoint of every run at tasks.lora.size.checkpoint_bytes;
- images: width x height x 3 bytes per planned image (an uncompressed PNG, the upper bound) plus
  PNG_EXTRA_BYTES for the infotext and row filters; the X/Y grids show every image again at its cell
  size (small images upscaled to grid_image.MIN_CELL_PX) beside the baseline column, and labels and
  margins add GRID_LABEL_FACTOR; prior preservation's class images not rendered yet count as images too,
  each with its latent file (4 fp32 channels at 1/8 the side);
- tables: ROW_BYTES_PER_IMAGE per image and ROW_BYTES_PER_STEP per training step;
- minus what the sweep's folder holds already (a re-run writes only what is missing), plus
  MIN_FREE_BYTES kept free for the catalog, the report, caches and logs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from storage.disk import size_text
from tasks.lora.size import checkpoint_bytes
from tasks.render.grid_image import MIN_CELL_PX
from tasks.sweep.axes import product_text
from tasks.sweep.cells import grid_cells
from tasks.sweep.ids import checkpoint_id
from tasks.sweep.plan import CheckpointRef, PreparedInputs, planned_runs, render_jobs, sweep_root
from tasks.sweep.spec import SweepSpec
from tasks.train.class_images import class_images_to_render

MIN_FREE_BYTES = 200 * 2**20
PNG_EXTRA_BYTES = 8 * 2**10
LATENT_HEADER_BYTES = 2**10
GRID_LABEL_FACTOR = 1.5
ROW_BYTES_PER_IMAGE = 4 * 2**10  # its images row and its metric rows
ROW_BYTES_PER_STEP = 64  # its losses row


@dataclass(frozen=True)
class SweepBytes:
    """The estimate, by kind, and how much of it the sweep's folder already holds."""

    checkpoints: int
    checkpoint_count: int
    images: int
    image_count: int
    tables: int
    already_written: int
    run_count: int = 0

    @property
    def to_write(self) -> int:
        return max(0, self.checkpoints + self.images + self.tables - self.already_written)


def image_bytes(width: int, height: int) -> int:
    """One PNG at most: raw RGB, a filter byte per row, the metadata."""
    return width * height * 3 + height + PNG_EXTRA_BYTES


def class_image_bytes(side: int) -> int:
    """One prior-preservation class image: its PNG and the sampler's latent beside it (4 fp32 channels at 1/8
    the side, SD1.x and SDXL alike, plus the safetensors header)."""
    return image_bytes(side, side) + 4 * 4 * math.ceil(side / 8) ** 2 + LATENT_HEADER_BYTES


def grid_cell_bytes(width: int, height: int) -> int:
    """One image as a grid cell: small images are upscaled by a whole factor to MIN_CELL_PX."""
    scale = max(1, math.ceil(MIN_CELL_PX / max(1, min(width, height))))
    return width * scale * height * scale * 3


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    total = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(parent, name)).st_size
            except OSError:
                continue
    return total


def estimate_sweep_bytes(spec: SweepSpec, inputs: PreparedInputs) -> SweepBytes:
    """What the planned runs, checkpoints and render jobs will write (see the module docstring)."""
    runs = planned_runs(spec, inputs)
    refs = [CheckpointRef(run_id=r.run_id, checkpoint_id=checkpoint_id(r.run_id, s), step=s, rank=r.rank,
                          lora_dir="") for r in runs for s in r.checkpoint_steps]
    checkpoints = sum((checkpoint_bytes(r) or 0) * len(r.checkpoint_steps) for r in runs)
    images = grids = count = 0
    for job in render_jobs(spec, inputs.model_paths, refs, runs, inputs.dataset_path, inputs.caption_prompts):
        cells = len(grid_cells(job))
        baseline_column = cells // len(job.lora_weights) if job.checkpoint else 0
        count += cells
        images += cells * image_bytes(job.width, job.height)
        grids += (cells + baseline_column) * grid_cell_bytes(job.width, job.height)
    images += sum(n * class_image_bytes(side) for side, n in class_images_to_render(runs).values())
    tables = count * ROW_BYTES_PER_IMAGE + sum(r.max_steps for r in runs) * ROW_BYTES_PER_STEP
    return SweepBytes(checkpoints, len(refs), images + int(grids * GRID_LABEL_FACTOR), count, tables,
                      folder_bytes(sweep_root(spec)), len(runs))


def space_problems(output_dir: Path, estimate: SweepBytes, free: int, field: str = "output_dir") -> list[str]:
    """The refusal, with the numbers, when the sweep's outputs and MIN_FREE_BYTES do not fit in `free`."""
    needed = estimate.to_write + MIN_FREE_BYTES
    if free >= needed:
        return []
    return [f"{field} {str(output_dir)!r}: the sweep needs about {size_text(needed)} on its disk and only "
            f"{size_text(free)} is free ({estimate.checkpoint_count} checkpoint(s) {size_text(estimate.checkpoints)}, "
            f"{estimate.image_count} image(s) with their grids {size_text(estimate.images)}, "
            f"tables {size_text(estimate.tables)}, {size_text(estimate.already_written)} of it already written, "
            f"{size_text(MIN_FREE_BYTES)} kept free); free some space, choose another output_dir or make the "
            "sweep smaller"]


def plan_text(spec: SweepSpec, estimate: SweepBytes) -> str:
    """`plan: 12 runs (1 base model x 3 learning_rate x 2 alpha x 2 ranks), 24 checkpoints, 1,920 images`."""
    configs = spec.training_configs()
    runs = estimate.run_count
    ranks = {len(c.training.ranks) for c in configs if c.training.ranks}
    how = product_text(len(spec.base_models), len(spec.datasets), spec.training_axes, len(spec.training_variants),
                       ranks.pop() if len(ranks) == 1 else None)
    return (f"plan: {runs} training run{'s' * (runs != 1)} ({how}), {estimate.checkpoint_count} checkpoints, "
            f"{estimate.image_count:,} images (max_runs = {spec.max_runs})")
