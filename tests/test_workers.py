"""Many machines: two process workers of one pool share a sweep's training runs, none twice.

The sweep's spec sets `[execution] train_deployment`, so each training run becomes a flow run
of the `lora-train/train-run` deployment from prefect.yaml; two `prefect worker` processes
(standing in for two GPU machines) pick them up against the test harness's server.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from tasks.train.claim import read_trainers
from tests.conftest import small_sweep_data, write_spec

# A private Prefect server, two workers and a sweep (~1-2 min on 2 cores): in `make test-slow`, which CI runs too.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
POOL = "lora-sweep-local"  # prefect.yaml's pool, created on the harness's private server
DEPLOYMENT = "lora-train/train-run"
WORKERS = ("gpu-a", "gpu-b")


def prefect_cli(env: dict[str, str], *args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"prefect {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def start_worker(env: dict[str, str], name: str, log: Path) -> subprocess.Popen:
    """One process worker, as on one GPU machine: one flow run at a time."""
    return subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--work-queue",
                             "training", "--name", name, "--limit", "1"],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def deployment_flow_runs() -> list[tuple[str, str]]:
    """(run_id parameter, final state) of every flow run of the training deployment."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def read() -> list[tuple[str, str]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[DEPLOYMENT.split("/")[1]])))
            return [(r.parameters["run"]["run_id"], r.state.type.value) for r in runs]

    return asyncio.run(read())


def test_two_workers_split_the_training_runs_and_none_trains_twice(prefect_harness, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.execution import check_train_deployment
    from flows.lora_sweep import lora_sweep

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PYTHONUNBUFFERED": "1"}
    with pytest.raises(ValueError, match="'lora-train/train-run' is not a deployment.*prefect deploy --name train-run"):
        check_train_deployment(DEPLOYMENT)  # a sweep fails before any work until the deployment exists
    prefect_cli(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    prefect_cli(env, "deploy", "--name", DEPLOYMENT.split("/")[1])
    data = small_sweep_data(tmp_path / "out", ranks=[2, 4], checkpoint_steps=[12])
    data["render"].update(samplers=["Euler a"], steps=[2], seeds=[1])
    data["execution"] = {"train_deployment": DEPLOYMENT}
    spec_path = write_spec(tmp_path, data)

    workers = [start_worker(env, name, tmp_path / f"{name}.log") for name in WORKERS]
    try:
        started = time.perf_counter()
        summary = lora_sweep(spec_path=str(spec_path))
        print(f"sweep over two workers: {time.perf_counter() - started:.1f} s")
    finally:
        for worker in workers:
            stop(worker)
    logs = "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in WORKERS)
    assert summary["failures"] == [], logs

    root = Path(summary["sweep_root"])
    trainers = {d.name: read_trainers(d) for d in sorted((root / "runs").iterdir())}
    assert len(trainers) == 2
    assert all(len(lines) == 1 for lines in trainers.values()), trainers  # no run trained twice
    assert {lines[0]["worker"] for lines in trainers.values()} == set(WORKERS), trainers  # the work was split
    assert all(lines[0]["pid"] != os.getpid() for lines in trainers.values())
    assert sorted(deployment_flow_runs()) == sorted((run_id, "COMPLETED") for run_id in trainers)
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone() == (2,)
        assert con.execute("SELECT count(*) FROM images").fetchone() == (1 + 2,)  # baseline + one per run


def test_make_demo_server_serves_the_prefect_ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flows/run_demo.py's server answers its UI URL with the UI's page (the UI is on in `make demo`)."""
    import signal
    import socket
    import urllib.request

    from flows.run_demo import ensure_server, ui_url

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_UI_ENABLED", "true")
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    server = ensure_server(f"http://127.0.0.1:{port}/api", port)
    assert server is not None  # a fresh port: this test started it, and stops it
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(ui_url(port), timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
