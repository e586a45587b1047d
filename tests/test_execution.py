"""`[execution]`: validated like the rest of the spec, never part of the sweep id; the Dask
runner's options and local GPU cluster; the per-run claim that keeps a run from training twice."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.execution import check_gpu_workers, dask_runner_options, local_gpu_cluster
from tasks.sweep.load import SpecError, parse_spec
from tasks.train.claim import claim_run, read_trainers, record_trainer
from tests.conftest import small_sweep_data


def spec_with(tmp_path: Path, execution: dict):
    data = small_sweep_data(tmp_path / "out")
    data["execution"] = execution
    return parse_spec(data)


def problems(tmp_path: Path, execution: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec_with(tmp_path, execution)
    return info.value.problems


def test_default_is_the_thread_runner_and_the_section_leaves_the_sweep_id_alone(tmp_path: Path) -> None:
    plain = parse_spec(small_sweep_data(tmp_path / "out"))
    dask = spec_with(tmp_path, {"runner": "dask", "n_workers": 3, "train_deployment": "lora-train/train-run"})
    assert plain.execution.runner == "threads" and plain.execution.train_deployment is None
    assert dask.sweep_id() == plain.sweep_id()  # where tasks run never changes what they compute
    assert dask.execution.local_workers() == 3


def test_every_bad_execution_value_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(tmp_path, {"runner": "mpi", "dask_address": "localhost:8786", "n_workers": 0,
                                "cuda_devices": ["0", "gpu1"], "gpus_per_task": 2,
                                "train_deployment": "train-run", "workers": 2})
    expected = [
        ("execution.runner", "'mpi'", "'threads' or 'dask'"),
        ("execution.dask_address", "'localhost:8786'", "tcp://scheduler-host:8786"),
        ("execution.n_workers", "0", "greater than or equal to 1"),
        ("execution.cuda_devices", "'gpu1'", "CUDA_VISIBLE_DEVICES"),
        ("execution.gpus_per_task", "2", "less than or equal to 1"),
        ("execution.train_deployment", "'train-run'", "'<flow name>/<deployment name>'"),
        ("execution.workers", "unknown key", "documented keys"),
    ]
    assert len(found) == len(expected), found
    for fragments in expected:
        assert any(all(f in p for f in fragments) for p in found), (fragments, found)


@pytest.mark.parametrize(("execution", "fragments"), [
    ({"n_workers": 2}, ["n_workers = 2", "only used with runner = 'dask'"]),
    ({"runner": "dask", "dask_address": "tcp://sched:8786", "cuda_devices": ["0"]},
     ["cuda_devices = ('0',)", "dask worker tcp://sched:8786 --resources GPU=1"]),
    ({"runner": "dask", "n_workers": 3, "cuda_devices": ["0", "1"]},
     ["n_workers = 3", "2 device(s)", "one worker per device"]),
    ({"runner": "dask", "cuda_devices": ["1", "1"]}, ["must not repeat", "'1'"]),
])
def test_execution_fields_that_disagree(tmp_path: Path, execution: dict, fragments: list[str]) -> None:
    message = "\n".join(problems(tmp_path, execution))
    assert all(f in message for f in fragments), message


def test_dask_runner_options_follow_the_spec(tmp_path: Path) -> None:
    remote = spec_with(tmp_path, {"runner": "dask", "dask_address": "tcp://sched:8786"}).execution
    assert dask_runner_options(remote) == {"address": "tcp://sched:8786"}
    local = spec_with(tmp_path, {"runner": "dask", "cuda_devices": ["2", "3"], "threads_per_worker": 2}).execution
    assert dask_runner_options(local) == {"cluster_class": local_gpu_cluster, "cluster_kwargs": {
        "n_workers": 2, "threads_per_worker": 2, "cuda_devices": ["2", "3"]}}


def test_local_cluster_pins_one_gpu_per_worker_and_declares_it() -> None:
    from distributed import Client

    with local_gpu_cluster(n_workers=2, threads_per_worker=1, cuda_devices=["0", "1"]) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        info = client.scheduler_info()["workers"]
    assert sorted(seen.values()) == ["0", "1"]
    assert [w["resources"] for w in info.values()] == [{"GPU": 1}, {"GPU": 1}]


def test_remote_cluster_without_gpu_workers_is_refused_with_the_fix() -> None:
    check_gpu_workers({"workers": {"a": {"resources": {"GPU": 1}}}}, "tcp://s:8786")
    with pytest.raises(RuntimeError, match="--resources GPU=1"):
        check_gpu_workers({"workers": {"a": {"resources": {}}, "b": {}}}, "tcp://s:8786")


def test_the_claim_makes_a_second_trainer_wait_for_the_first(tmp_path: Path) -> None:
    """Two claimants of one run: the second gets the claim only after the first let go."""
    events: list[str] = []

    def trainer(name: str, hold_s: float) -> None:
        with claim_run(tmp_path / "run"):
            events.append(f"{name} start")
            time.sleep(hold_s)
            events.append(f"{name} end")

    first = threading.Thread(target=trainer, args=("a", 0.5))
    first.start()
    time.sleep(0.1)
    trainer("b", 0.0)
    first.join()
    assert events == ["a start", "a end", "b start", "b end"]


def test_a_killed_claim_holder_leaves_no_stale_claim(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from tasks.train.claim import claim_run\n"
            "with claim_run(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    started = time.monotonic()
    with claim_run(tmp_path / "run"):
        assert time.monotonic() - started < 5
        assert json.loads((tmp_path / "run" / "train.lock").read_text())["pid"] != holder.pid
        record_trainer(tmp_path / "run", "r1")
    assert [t["run_id"] for t in read_trainers(tmp_path / "run")] == ["r1"]


def test_two_concurrent_trainers_of_one_run_train_it_once(tmp_path: Path) -> None:
    """A duplicate submission (another worker, a retry) waits on the claim, then finds the run done."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.preflight import prepare_inputs
    from tasks.sweep.plan import training_runs
    from tasks.train.child_process import train_in_subprocess

    spec = parse_spec(small_sweep_data(tmp_path / "out", ranks=[2], max_steps=4, checkpoint_steps=[4]))
    inputs = prepare_inputs(spec)
    [run] = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(train_in_subprocess, [run, run]))
    assert results[0] == results[1] and results[0].status == "completed"
    trainers = read_trainers(tmp_path / "out" / "small" / "runs" / run.run_id)
    assert len(trainers) == 1, trainers


def test_two_concurrent_renderers_of_one_job_render_each_image_once(tmp_path: Path, monkeypatch) -> None:
    """Two sweeps rendering the same job at once: the second waits on the job's claim, then finds it done."""
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq
    from PIL import Image

    import tasks.render.job as render_module
    from storage.layout import SweepLayout
    from tasks.preflight import prepare_inputs
    from tasks.sweep.cells import grid_cells, image_id
    from tasks.sweep.plan import render_jobs

    data = small_sweep_data(tmp_path / "out")
    data["render"].update(samplers=["Euler a"], steps=[2])
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    [job] = render_jobs(spec, inputs.model_paths, [], [], inputs.dataset_path)  # the no-LoRA baseline
    writes: Counter[str] = Counter()
    real_atomic_file = render_module.atomic_file

    def counting_atomic_file(path: Path, **kwargs):  # every PNG the job writes goes through it
        writes[Path(path).name] += 1
        return real_atomic_file(path, **kwargs)

    monkeypatch.setattr(render_module, "atomic_file", counting_atomic_file)
    with ThreadPoolExecutor(2) as pool:
        files = list(pool.map(render_module.render_job, [job, job]))

    expected = {f"{image_id(job, c)}.png" for c in grid_cells(job)}
    assert len(expected) == 2 and files[0] == files[1]
    assert writes == Counter({name: 1 for name in expected}), writes
    rows = pq.read_table(files[0]).to_pylist()
    assert {Path(r["path"]).name for r in rows} == expected
    for row in rows:
        with Image.open(row["path"]) as image:
            image.verify()
    assert len(render_module.read_renderers(SweepLayout(Path(job.sweep_root)), job.render_id)) == 1


def test_every_execution_example_in_the_scaling_docs_is_a_valid_section(tmp_path: Path) -> None:
    import re
    import tomllib

    text = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    blocks = [tomllib.loads(b)["execution"] for b in re.findall(r"```toml\n(.*?)```", text, re.S)]
    assert len(blocks) >= 4
    for block in blocks:
        spec_with(tmp_path, block)


@pytest.mark.slow  # two training runs through the flow (~85 s on 2 cores): in `make test-slow`, which CI runs too
def test_gpu_limit_lets_one_training_run_at_a_time(prefect_harness, tmp_path: Path) -> None:
    """With the threads runner, training tasks hold a slot of a Prefect global concurrency limit;
    at 1 slot the two runs of the sweep train one after the other (without it both threads overlap)."""
    import duckdb
    from prefect.client.orchestration import get_client

    from flows.lora_sweep import lora_sweep
    from tests.conftest import write_spec

    data = small_sweep_data(tmp_path / "out", max_steps=4, checkpoint_steps=[4])
    data["render"].update(seeds=[1], samplers=["Euler a"], steps=[2])
    data["execution"] = {"gpu_limit": "test-one-gpu", "gpu_limit_on_cpu": True, "gpu_limit_slots": 1}
    summary = lora_sweep(spec_path=str(write_spec(tmp_path, data)))
    assert summary["failures"] == []
    with duckdb.connect(str(Path(summary["sweep_root"]) / "catalog.duckdb"), read_only=True) as con:
        spans = con.execute("SELECT started_at, finished_at FROM runs ORDER BY started_at").fetchall()
    assert len(spans) == 2
    assert spans[0][1] <= spans[1][0], spans  # the second started after the first finished
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("test-one-gpu").limit == 1


def test_gpu_limit_settings_are_refused_with_the_dask_runner(tmp_path: Path) -> None:
    found = problems(tmp_path, {"runner": "dask", "gpu_limit_on_cpu": True, "gpu_limit_slots": 2})
    assert any("gpu_limit_on_cpu = True applies to runner = 'threads'" in p for p in found), found
    assert any("gpu_limit_slots = 2 applies to runner = 'threads'" in p for p in found), found
    found = problems(tmp_path, {"gpu_limit": "bad name!"})
    assert any("execution.gpu_limit" in p and "bad name!" in p for p in found), found
