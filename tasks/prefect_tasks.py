"""Thin Prefect task wrappers around the plain task functions: the only module with `@task`.

Tasks pass ids, paths and small specs, never tensors. Only I/O-bound steps retry; training and
rendering failures propagate so Prefect marks the task failed.

The flow imports this module and stays free of torch: importing a torch stage (tasks.preflight,
tasks.render.job, tasks.score.job) costs 7.5 s and 455-485 MB of memory on these 2-core machines,
against 2.2 s and 141 MB for the whole flow module. So the wrappers that run torch import their
stage inside the task, when it runs; everything torch-free is imported here at the top.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.concurrency.sync import concurrency
from prefect.states import Failed

from reports.build_report import build_report
from storage.catalog import build_catalog
from storage.layout import SweepLayout
from tasks.sweep.devices import cpu_threads_per_task
from tasks.sweep.load import SpecError, load_spec
from tasks.sweep.plan import PreparedInputs, RenderJobSpec, TrainingRunSpec
from tasks.sweep.spec import SweepSpec
from tasks.train.child_process import train_in_subprocess
from tasks.train.remote import train_via_deployment


@task(name="load-spec", cache_policy=NO_CACHE)
def load_spec_task(spec_path: str) -> SweepSpec | State:
    """The validated spec, or a Failed state whose message lists every problem (a user's mistake is not
    a crash: no traceback)."""
    try:
        return load_spec(spec_path)
    except SpecError as err:
        return Failed(message=str(err))


@task(name="prepare-inputs", cache_policy=NO_CACHE)
def prepare_inputs_task(spec: SweepSpec) -> PreparedInputs | State:
    """Checked inputs, or a Failed state listing every problem with them (no traceback, nothing written)."""
    from tasks.preflight import InputError, prepare_inputs  # torch: see the module docstring

    try:
        return prepare_inputs(spec)
    except InputError as err:
        return Failed(message=str(err))


def gpu_slot(limit: str | None):
    """Hold one slot of the Prefect global concurrency limit `limit` (None: no limit)."""
    if not limit:
        return contextlib.nullcontext()
    return concurrency(limit, occupy=1, strict=True)


@task(name="train-lora", task_run_name="train-{run.run_id}", cache_policy=NO_CACHE)
def train_task(run: TrainingRunSpec, gpu_limit: str | None = None):
    """Train in a child process, so its memory (GPU memory too) is returned when it ends."""
    with gpu_slot(gpu_limit):
        # This process's idle render pipelines (tasks.models.pipeline_pool) must not hold the GPU memory the
        # child needs; looked up rather than imported, so a flow that has rendered nothing imports no torch here.
        pool = sys.modules.get("tasks.models.pipeline_pool")
        if pool is not None:
            pool.release_idle_pipelines()
        return train_in_subprocess(run)


@task(name="train-lora-on-worker", task_run_name="train-{run.run_id}", cache_policy=NO_CACHE)
def train_on_worker_task(run: TrainingRunSpec, deployment: str):
    """Submit the run as a flow run of `deployment` (any worker of its pool trains it) and wait for it."""
    return train_via_deployment(run, deployment)


@task(name="render-grid", task_run_name="render-{job.render_id}", cache_policy=NO_CACHE)
def render_task(job: RenderJobSpec, gpu_limit: str | None = None) -> str:
    """Render the job's grid, then score its images (each step skips work already on disk)."""
    import torch  # torch and the two stages: see the module docstring

    from tasks.render.job import render_job
    from tasks.score.job import score_job

    torch.set_num_threads(cpu_threads_per_task())  # two render tasks share the cores, not 2x each
    with gpu_slot(gpu_limit):
        images = render_job(job)
    score_job(job)
    return str(images)


@task(name="build-catalog", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def catalog_task(sweep_root: str) -> str:
    return str(build_catalog(SweepLayout(Path(sweep_root))))


@task(name="build-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def report_task(sweep_root: str) -> str:
    return str(build_report(Path(sweep_root)))
