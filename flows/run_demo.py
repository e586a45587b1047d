"""`make demo`: run the demo sweep through a real Prefect deployment on this machine.

Starts a loopback Prefect server (with its web UI) if none answers, creates the process work pool,
deploys from prefect.yaml, runs `prefect deployment run lora-sweep/<name>`, runs a worker until that
flow run ends, then prints the outcome, the flow run's page in the Prefect UI (its artifacts: the
summary, the report link, the best table), the report path and an example DuckDB query.
Exits non-zero unless the flow run COMPLETED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POOL = "lora-sweep-local"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the prefect CLI of this environment non-interactively."""
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"`prefect {' '.join(args)}` failed:\n{result.stdout}\n{result.stderr}")
    return result


def server_answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def ui_url(port: int) -> str:
    """The Prefect UI of the loopback server (served by the same process as the API)."""
    return f"http://127.0.0.1:{port}"


def ensure_server(api_url: str, port: int) -> subprocess.Popen | None:
    """Start `prefect server start` on 127.0.0.1 in the background unless one already answers; return the
    started process (its own session: `os.killpg(process.pid, ...)` stops it), None when one answered."""
    if server_answers(api_url):
        print(f"Prefect server: using the one at {api_url}")
        return None
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"Prefect server: starting on 127.0.0.1:{port} (log {log})")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not server_answers(api_url):
        if time.monotonic() > deadline:
            raise SystemExit(f"Prefect server did not answer at {api_url} within 180 s; see {log}")
        time.sleep(1)
    return process


def flow_run_state(flow_run_id: str) -> tuple[str, str | None]:
    # Imported here, not at the top: prefect reads PREFECT_HOME and PREFECT_API_URL when imported, and main() sets them.
    from prefect.client.orchestration import get_client

    async def read() -> tuple[str, str | None]:
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            return run.state.type.value, run.state.message

    return asyncio.run(read())


def run_worker_until_done(flow_run_id: str, timeout_s: float) -> tuple[str, str | None]:
    """Run a process worker until the flow run reaches a terminal state, then stop the worker."""
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                               "--limit", "1"], cwd=REPO)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            state, message = flow_run_state(flow_run_id)
            if state in TERMINAL:
                return state, message
            if worker.poll() is not None:
                return f"worker exited ({worker.returncode}) with the run {state}", message
            if time.monotonic() > deadline:
                return f"TIMED OUT after {timeout_s:.0f} s in state {state}", message
            time.sleep(2)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default="demo")
    parser.add_argument("--port", type=int, default=int(os.environ.get("LORA_SWEEP_PREFECT_PORT", "4200")))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("PREFECT_HOME", str(REPO / ".prefect"))
    os.environ.setdefault("PREFECT_API_URL", f"http://127.0.0.1:{args.port}/api")
    for key, value in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "HF_HUB_OFFLINE": "1", "PREFECT_UI_ENABLED": "true"}.items():
        os.environ.setdefault(key, value)

    ensure_server(os.environ["PREFECT_API_URL"], args.port)
    if os.environ["PREFECT_UI_ENABLED"].lower() in ("1", "true", "yes"):
        print(f"Prefect UI: {ui_url(args.port)} (flow runs, logs and each run's artifacts)")
    if prefect("work-pool", "inspect", POOL, check=False).returncode != 0:
        prefect("work-pool", "create", POOL, "--type", "process")
    prefect("deploy", "--all")
    out = prefect("deployment", "run", f"lora-sweep/{args.deployment}").stdout
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    if not match:
        raise SystemExit(f"could not find the flow run id in:\n{out}")
    flow_run_id = match.group(1)
    print(f"Flow run {flow_run_id} created from lora-sweep/{args.deployment}; starting a worker")
    state, message = run_worker_until_done(flow_run_id, args.timeout)
    wall = time.perf_counter() - started
    print(f"\nFlow run {flow_run_id}: {state}{f' ({message})' if message else ''}")
    print(f"Wall time: {wall:.1f} s")
    # Open the UI at its root: this Prefect server answers 404 to a deep link typed into the address bar.
    print(f"In the Prefect UI: {ui_url(args.port)} -> Runs -> flow run {flow_run_id} -> Artifacts (the summary, "
          "the report link, the best checkpoint per metric); the Artifacts page lists them for every sweep")
    _print_results(args.deployment)
    return 0 if state == "COMPLETED" else 1


def _print_results(deployment: str) -> None:
    """Print the report path and one example query for the demo's sweep folder."""
    spec_json = REPO / "outputs" / deployment / "spec.json"
    if not spec_json.exists():
        return
    root = spec_json.parent
    print(f"Report:  {root / 'report' / 'index.html'}")
    print(f"Catalog: {root / 'catalog.duckdb'}")
    print(f"Every sweep in {root.parent}: {root.parent / 'index.html'}, {root.parent / 'catalog.duckdb'}")
    print("Example query (the DuckDB shell the project installs, or Python's duckdb):")
    print(f"  {Path(sys.executable).parent / 'duckdb'} -readonly {root / 'catalog.duckdb'} \\\n"
          "    \"SELECT rank, checkpoint_step, lora_weight, count(*) AS images FROM grid GROUP BY ALL ORDER BY ALL\"")
    print(json.dumps({"sweep_root": str(root)}))


if __name__ == "__main__":
    sys.exit(main())
