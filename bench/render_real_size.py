"""The render task's overhead at a real model's size: `render_job` against the bare batched pipeline calls, as
`bench.render_bench` measures it on the tiny model, on SD1.5 built from its public configs with random weights
(`tasks.models.full_size`; speed does not depend on the weights) at 512 px on a CUDA GPU. A dry run (CPU) runs
the same code on the tiny model at 64 px with 2 denoising steps.

At this size a PNG takes tens of milliseconds to encode, so what the render task writes matters: its writer
threads encode a batch's PNGs while the next batch denoises, and the job's grids on several threads.
"""

from __future__ import annotations

from pathlib import Path

from bench.measure import Row
from bench.render_bench import overhead_rows, paired_overhead
from bench.workspace import Workspace

SUITE = "render-size"


def bench_render_real_size(scratch: Path, *, dry_run: bool, repeats: int) -> list[Row]:
    """Rows: ours and bare images/s at 1x and 4x the bench grid, and bare / ours, for SD1.5 512 px (or the dry
    run's tiny model)."""
    if dry_run:
        label, model, size, steps = "tiny-sd15 64px", ("tiny-sd15", "builtin:tiny-sd15"), 64, 2
    else:
        from tasks.models.full_size import ensure_full_size

        path = ensure_full_size("sd15", cache=scratch / "full-size")
        label, model, size, steps = "sd15 512px", ("sd15-random", str(path)), 512, 20
    ws = Workspace.create(scratch / "workspace", model=model, size=size, steps=steps, max_steps=2, batch_size=1)
    job = ws.render_job(ws.trained_checkpoint())
    times = paired_overhead(job, scratch / "render", repeats=repeats)
    return overhead_rows(SUITE, f"{label} ", job, times)
