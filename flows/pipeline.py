"""Training and rendering as one pipeline: a checkpoint's grid renders as soon as the checkpoint is saved.

The flow hands every training run and the plan's render jobs to `run_pipeline`. It submits the
no-LoRA baselines first, then, while runs train, watches each run's checkpoint folders and submits
a checkpoint's render job once the folder is complete (and its base model's baseline has finished,
which its metrics compare against). With the threads runner at most `CONCURRENT_TASKS` tasks are in
flight and a ready render goes before the next training run, so images appear while training goes
on without more tasks than the machine (and the GPU limit) allows; Dask and the train deployment
get everything at once and schedule it themselves. The jobs, ids and pixels are the ones the
sequential order made: only when a task starts changes.

`on_progress` is called after each finished task with the counts so far (live catalog and report).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefect.futures import PrefectFuture

from flows.execution import SweepExecutor
from storage.layout import SweepLayout
from tasks.lora.files import checkpoint_complete
from tasks.sweep.cells import grid_cells
from tasks.sweep.devices import CONCURRENT_TASKS
from tasks.sweep.plan import RenderJobSpec, TrainingRunSpec

POLL_S = 0.5  # how often saved checkpoints are looked for while tasks run


@dataclass
class PipelineState:
    """What has been submitted and what has finished; the counts the progress line shows."""

    runs: list[TrainingRunSpec]
    jobs: list[RenderJobSpec]  # every planned render job: baselines first
    train_futures: dict[str, PrefectFuture] = field(default_factory=dict)
    render_futures: dict[str, PrefectFuture] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)  # ids of tasks that ended, either way
    # Looked up on every poll and progress call: counted and indexed once.
    cells: dict[str, int] = field(init=False)  # render id -> images in its grid
    run_of: dict[str, TrainingRunSpec] = field(init=False)

    def __post_init__(self) -> None:
        self.cells = {j.render_id: len(grid_cells(j)) for j in self.jobs}
        self.run_of = {r.run_id: r for r in self.runs}

    @property
    def runs_done(self) -> int:
        return sum(1 for r in self.runs if r.run_id in self.finished)

    @property
    def images_done(self) -> int:
        return sum(self.cells[j.render_id] for j in self.jobs if j.render_id in self.finished
                   and self.render_futures[j.render_id].state.is_completed())

    @property
    def images_planned(self) -> int:
        return sum(self.cells.values())

    def submitted_jobs(self) -> list[RenderJobSpec]:
        return [j for j in self.jobs if j.render_id in self.render_futures]


def run_pipeline(executor: SweepExecutor, runs: list[TrainingRunSpec], jobs: list[RenderJobSpec],
                 on_progress: Callable[[PipelineState], None] | None = None) -> PipelineState:
    """Train every run and render every job whose checkpoint gets saved; returns when all have ended."""
    state = PipelineState(runs, jobs)
    slots = CONCURRENT_TASKS if executor.execution.runner == "threads" and not executor.execution.train_deployment \
        else len(runs) + len(jobs)
    pending_runs = list(runs)
    pending_jobs = list(jobs)
    while pending_runs or pending_jobs or _running(state):
        ready = [j for j in pending_jobs if _ready(j, state)]
        free = slots - len(_running(state))
        for job in ready[:max(free, 0)]:
            state.render_futures[job.render_id] = executor.render([job])[0]
            pending_jobs.remove(job)
            free -= 1
        while free > 0 and pending_runs:
            run = pending_runs.pop(0)
            state.train_futures[run.run_id] = executor.train([run])[0]
            free -= 1
        if not pending_runs and not _running(state) and not [j for j in pending_jobs if _ready(j, state)]:
            break  # what is left waits for checkpoints no run will save (a run failed before saving them)
        if _collect_finished(state) and on_progress is not None:
            on_progress(state)
        time.sleep(POLL_S)
    _collect_finished(state)
    return state


def _running(state: PipelineState) -> list[str]:
    futures = {**state.train_futures, **state.render_futures}
    return [key for key in futures if key not in state.finished]


def _collect_finished(state: PipelineState) -> bool:
    """Mark tasks whose futures reached a final state; True when any did."""
    newly = [key for key, f in {**state.train_futures, **state.render_futures}.items()
             if key not in state.finished and f.state.is_final()]
    state.finished.update(newly)
    return bool(newly)


def _ready(job: RenderJobSpec, state: PipelineState) -> bool:
    """A baseline is ready at once; a checkpoint's job once its folder is complete and its baseline ended."""
    if job.checkpoint is None:
        return True
    if job.baseline_render_id is not None and job.baseline_render_id not in state.finished:
        return False
    run = state.run_of.get(job.checkpoint.run_id)
    if run is None or run.run_id not in state.train_futures:
        return False
    return checkpoint_complete(SweepLayout(Path(run.sweep_root)).checkpoint_dir(run.run_id, job.checkpoint.step))
