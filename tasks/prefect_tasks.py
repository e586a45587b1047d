"""Thin Prefect task wrappers around the plain task functions.

Heavy imports (torch, diffusers) happen inside each wrapper, so the flow module imports fast
and stays free of torch. Tasks pass ids, paths and small specs, never tensors. Only I/O-bound
steps retry; training and rendering failures propagate so Prefect marks the task failed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.inputs import PreparedInputs
from tasks.plan import RenderJobSpec, TrainingRunSpec
from tasks.spec import SweepSpec


@task(name="load-spec", cache_policy=NO_CACHE)
def load_spec_task(spec_path: str) -> SweepSpec:
    from tasks.spec import load_spec

    return load_spec(spec_path)


@task(name="prepare-inputs", cache_policy=NO_CACHE)
def prepare_inputs_task(spec: SweepSpec) -> PreparedInputs:
    from tasks.inputs import prepare_inputs

    return prepare_inputs(spec)


def gpu_slot(limit: str | None):
    """Hold one slot of the Prefect global concurrency limit `limit` (None: no limit)."""
    if not limit:
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency(limit, occupy=1, strict=True)


@task(name="train-lora", task_run_name="train-{run.run_id}", cache_policy=NO_CACHE)
def train_task(run: TrainingRunSpec, gpu_limit: str | None = None):
    """Train in a child process, so its memory (GPU memory too) is returned when it ends."""
    from tasks.train_process import train_in_subprocess

    with gpu_slot(gpu_limit):
        return train_in_subprocess(run)


@task(name="train-lora-on-worker", task_run_name="train-{run.run_id}", cache_policy=NO_CACHE)
def train_on_worker_task(run: TrainingRunSpec, deployment: str):
    """Submit the run as a flow run of `deployment` (any worker of its pool trains it) and wait for it."""
    from tasks.remote_training import train_via_deployment

    return train_via_deployment(run, deployment)


@task(name="render-grid", task_run_name="render-{job.render_id}", cache_policy=NO_CACHE)
def render_task(job: RenderJobSpec, gpu_limit: str | None = None) -> str:
    """Render the job's grid, then score its images (each step skips work already on disk)."""
    import torch

    from tasks.devices import cpu_threads_per_task
    from tasks.render import render_job
    from tasks.score import score_job

    torch.set_num_threads(cpu_threads_per_task())  # two render tasks share the cores, not 2x each
    with gpu_slot(gpu_limit):
        images = render_job(job)
    score_job(job)
    return str(images)


@task(name="build-catalog", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def catalog_task(sweep_root: str) -> str:
    from storage.catalog import build_catalog
    from storage.layout import SweepLayout

    return str(build_catalog(SweepLayout(Path(sweep_root))))


@task(name="build-report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def report_task(sweep_root: str) -> str:
    from reports.build_report import build_report

    return str(build_report(Path(sweep_root)))
