"""The `[execution]` section: where a sweep's tasks run (threads, Dask, a training deployment)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from tasks.sweep.fields import Frozen, PositiveInt, unique_values


class ExecutionSpec(Frozen):
    """Where the sweep's tasks run; never changes what they compute, so it is not part of the sweep id.

    `threads` (default): the flow's own thread pool. `dask`: training and render tasks fan out
    over a Dask cluster, a LocalCluster of `n_workers` processes or the scheduler at
    `dask_address`; each task reserves one `GPU` worker resource (`gpus_per_task`).
    `train_deployment` submits every training run as a flow run of that deployment instead, so
    the work pool's workers (one per GPU machine) share the training.
    """

    runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None
    n_workers: PositiveInt | None = Field(default=None, le=256, description="LocalCluster worker processes; default 2")
    threads_per_worker: PositiveInt = Field(default=1, le=64)
    cuda_devices: tuple[str, ...] = ()
    gpus_per_task: int = Field(default=1, ge=0, le=1, description="Dask resource GPU each train/render task holds")
    train_deployment: str | None = None
    # Threads runner: training and render tasks hold one slot of this Prefect global concurrency
    # limit while they run (one GPU: one at a time). Created on first use with `gpu_limit_slots`
    # slots (0: one per CUDA device here). Applied when CUDA is present, or always with
    # gpu_limit_on_cpu = true. "" turns it off.
    gpu_limit: str = Field(default="lora-sweep-gpu", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]*$")
    gpu_limit_slots: int = Field(default=0, ge=0, le=64)
    gpu_limit_on_cpu: bool = False

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(tcp|tls|ucx|inproc)://[^\s/:]+(:\d+)?", value):
            raise ValueError("allowed: a Dask scheduler address such as 'tcp://scheduler-host:8786' "
                             "(tcp://, tls://, ucx:// or inproc://)")
        return value

    @field_validator("cuda_devices")
    @classmethod
    def _device_ids(cls, value: tuple[str, ...], info: Any) -> tuple[str, ...]:
        bad = [d for d in value if not re.fullmatch(r"\d+|GPU-[0-9A-Za-z-]+|MIG-[0-9A-Za-z/-]+", d)]
        if bad:
            raise ValueError(f"{bad} are not CUDA device ids; allowed: what CUDA_VISIBLE_DEVICES takes, "
                             "e.g. ['0', '1'] or GPU UUIDs 'GPU-8f6c...'")
        return unique_values(value, info.field_name)

    @field_validator("train_deployment")
    @classmethod
    def _deployment_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^/\s]+/[^/\s]+", value):
            raise ValueError("allowed: '<flow name>/<deployment name>', e.g. 'lora-train/train-run'")
        return value

    @model_validator(mode="after")
    def _fields_agree(self) -> ExecutionSpec:
        problems = []
        dask_only = ("dask_address", "n_workers", "threads_per_worker", "cuda_devices", "gpus_per_task")
        if self.runner == "threads":
            problems += [f"{k} = {getattr(self, k)!r} is only used with runner = 'dask' (runner is 'threads')"
                         for k in dask_only if k in self.model_fields_set]
        elif self.dask_address is not None:
            local = [f"{k} = {getattr(self, k)!r}" for k in ("n_workers", "cuda_devices") if k in self.model_fields_set]
            if local:
                problems.append(f"{' and '.join(local)} describe the LocalCluster the flow starts without "
                                f"dask_address; with dask_address = {self.dask_address!r} start the workers yourself "
                                f"(`dask worker {self.dask_address} --resources GPU=1`)")
        if self.runner == "dask":
            problems += [f"{k} = {getattr(self, k)!r} applies to runner = 'threads'; with 'dask' each task holds "
                         "one Dask GPU resource instead (gpus_per_task)"
                         for k in ("gpu_limit", "gpu_limit_slots", "gpu_limit_on_cpu") if k in self.model_fields_set]
        if self.cuda_devices and self.n_workers is not None and self.n_workers != len(self.cuda_devices):
            problems.append(f"n_workers = {self.n_workers} but cuda_devices lists {len(self.cuda_devices)} "
                            f"device(s) {list(self.cuda_devices)}; allowed: one worker per device (omit n_workers)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def local_workers(self) -> int:
        """Worker processes of the LocalCluster the dask runner starts (one per CUDA device when listed)."""
        return len(self.cuda_devices) or self.n_workers or 2
