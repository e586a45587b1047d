"""Where a sweep's training and render tasks run, from the spec's `[execution]` table.

`threads` uses the flow's own thread pool (the default, unchanged). `dask` opens a
prefect-dask DaskTaskRunner over a LocalCluster of worker processes (one per GPU when
`cuda_devices` is given, each pinned with CUDA_VISIBLE_DEVICES) or over the scheduler at
`dask_address`. Every worker declares one `GPU` resource and every train/render task reserves
one, so one task holds one GPU. With `train_deployment`, training runs become flow runs of
that deployment, picked up by the work pool's workers; this flow only waits for them.
Tasks receive ids, paths and small specs, never tensors, which is what lets them travel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from tasks.prefect_tasks import render_task, train_on_worker_task, train_task
from tasks.sweep.devices import cuda_device_count
from tasks.sweep.execution_spec import ExecutionSpec
from tasks.sweep.plan import RenderJobSpec, TrainingRunSpec

GPU_RESOURCE = "GPU"
# DASK_IMPORT_NOTE: dask, distributed and prefect_dask are imported inside the functions of the dask
# runner: the default threads runner never uses them (0.26 s more per flow start, measured here).


@dataclass
class SweepExecutor:
    """Submits the sweep's training runs and render jobs to the runner the spec chose."""

    execution: ExecutionSpec
    runner: TaskRunner
    waiter: TaskRunner | None  # threads that wait on training flow runs of `train_deployment`
    gpu_limit: str | None = None  # threads runner: the global concurrency limit train/render tasks hold

    def train(self, runs: list[TrainingRunSpec]) -> list[PrefectFuture]:
        if self.execution.train_deployment and self.waiter is not None:
            return self.waiter.map(train_on_worker_task,
                                   {"run": runs, "deployment": unmapped(self.execution.train_deployment)})
        return self._map(train_task, {"run": runs})

    def render(self, jobs: list[RenderJobSpec]) -> list[PrefectFuture]:
        return self._map(render_task, {"job": jobs})

    def _map(self, task: Any, parameters: dict[str, Any]) -> list[PrefectFuture]:
        if not next(iter(parameters.values())):
            return []
        if self.execution.runner != "dask" or not self.execution.gpus_per_task:
            if self.gpu_limit:
                parameters = {**parameters, "gpu_limit": unmapped(self.gpu_limit)}
            return self.runner.map(task, parameters)
        import dask  # Dask loads only with runner = 'dask' (see DASK_IMPORT_NOTE)

        with dask.annotate(resources={GPU_RESOURCE: self.execution.gpus_per_task}):
            return self.runner.map(task, parameters)


@contextmanager
def sweep_executor(execution: ExecutionSpec, n_runs: int) -> Iterator[SweepExecutor]:
    """The flow's own runner, or a started DaskTaskRunner; plus waiter threads for remote training."""
    if execution.train_deployment:
        check_train_deployment(execution.train_deployment)
    gpu_limit = ensure_gpu_limit(execution) if execution.runner == "threads" else None
    with _main_runner(execution) as runner:
        if execution.train_deployment is None:
            yield SweepExecutor(execution, runner, None, gpu_limit)
            return
        with ThreadPoolTaskRunner(max_workers=max(n_runs, 1)) as waiter:
            yield SweepExecutor(execution, runner, waiter, gpu_limit)


def ensure_gpu_limit(execution: ExecutionSpec) -> str | None:
    """The global concurrency limit the threads runner's tasks hold, created if missing; None when off.

    On when CUDA is present here (or gpu_limit_on_cpu). A limit that already exists on the server
    is used as it is, so `prefect gcl update lora-sweep-gpu --limit N` changes it for every sweep.
    """
    if not execution.gpu_limit:
        return None
    devices = cuda_device_count()
    if not devices and not execution.gpu_limit_on_cpu:
        return None
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(execution.gpu_limit)
        except ObjectNotFound:
            slots = execution.gpu_limit_slots or max(devices, 1)
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=execution.gpu_limit,
                                                                                    limit=slots))
            except ObjectAlreadyExists:  # another sweep created it meanwhile
                pass
    return execution.gpu_limit


@contextmanager
def _main_runner(execution: ExecutionSpec) -> Iterator[TaskRunner]:
    if execution.runner == "threads":
        yield FlowRunContext.get().task_runner
        return
    from prefect_dask import DaskTaskRunner  # see DASK_IMPORT_NOTE

    with DaskTaskRunner(**dask_runner_options(execution)) as runner:
        if execution.dask_address and execution.gpus_per_task:
            check_gpu_workers(runner.client.scheduler_info(), execution.dask_address)
        yield runner


def dask_runner_options(execution: ExecutionSpec) -> dict[str, Any]:
    """DaskTaskRunner arguments: the scheduler address, or our LocalCluster factory and its size."""
    if execution.dask_address:
        return {"address": execution.dask_address}
    return {"cluster_class": local_gpu_cluster,
            "cluster_kwargs": {"n_workers": execution.local_workers(),
                               "threads_per_worker": execution.threads_per_worker,
                               "cuda_devices": list(execution.cuda_devices)}}


def local_gpu_cluster(n_workers: int, threads_per_worker: int, cuda_devices: list[str]):
    """A loopback Dask cluster of `n_workers` worker processes, each declaring one GPU resource.

    With `cuda_devices`, worker i sees only device cuda_devices[i] (set before it imports torch),
    so `cuda` inside a task is that worker's own GPU. LocalCluster cannot give each worker its own
    environment, hence a SpecCluster of Nannies.
    """
    from distributed import Nanny, Scheduler, SpecCluster  # see DASK_IMPORT_NOTE

    workers = {}
    for i in range(n_workers):
        options: dict[str, Any] = {"nthreads": threads_per_worker, "host": "127.0.0.1",
                                   "resources": {GPU_RESOURCE: 1}}
        if cuda_devices:
            options["env"] = {"CUDA_VISIBLE_DEVICES": cuda_devices[i]}
        workers[f"worker-{i}" if not cuda_devices else f"cuda-{cuda_devices[i]}"] = {"cls": Nanny, "options": options}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="lora-sweep")


def check_train_deployment(name: str) -> None:
    """Fail before any work when `execution.train_deployment` names no deployment on this server."""
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(
                f"execution.train_deployment = {name!r} is not a deployment on the Prefect server at "
                f"{PREFECT_API_URL.value()}; create it with `prefect deploy --name {name.split('/')[1]}` from the "
                "checkout (prefect.yaml defines 'lora-train/train-run') and start workers for its pool") from None


def check_gpu_workers(scheduler_info: dict[str, Any], address: str) -> None:
    """Tasks that reserve a GPU wait forever on workers without one: say so before submitting."""
    workers = scheduler_info.get("workers", {})
    if workers and not any(w.get("resources", {}).get(GPU_RESOURCE) for w in workers.values()):
        raise RuntimeError(
            f"execution.gpus_per_task = 1 but none of the {len(workers)} Dask worker(s) at {address} declares a "
            f"{GPU_RESOURCE} resource; start them with `dask worker {address} --resources {GPU_RESOURCE}=1` "
            "or set gpus_per_task = 0")
