"""Zombie flow runs: a run of the sweep killed with SIGKILL is marked CRASHED on the Prefect server
when the sweep starts again, naming the new run; live and finished runs are left as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.stale_runs import crash_dead_runs, lock_path
from storage.layout import SweepLayout
from tests.conftest import small_sweep_data, write_spec
from tests.test_resilience import kill_when, start_flow

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys, time; from pathlib import Path; from tasks.sweep.claims import claim\n"
        "with claim(Path(sys.argv[1]), 'flow run'):\n    print('held', flush=True); time.sleep(120)")


def hold_lock(path: Path) -> subprocess.Popen:
    """A process holding the lock at `path`, as a live flow run's process does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_only_running_flow_runs_whose_process_is_gone_are_marked_crashed(prefect_harness, tmp_path: Path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    @flow(name="stale-runs-probe")
    def probe() -> None:
        pass

    layout = SweepLayout(tmp_path / "sweep")
    with get_client(sync_client=True) as client:
        dead, alive, finished, current = (client.create_flow_run(probe, state=Running()) for _ in range(4))
        client.set_flow_run_state(finished.id, Completed(), force=True)
    holders = {run.id: hold_lock(lock_path(layout, run.id)) for run in (dead, alive, finished)}
    for run in (dead, finished):
        holders[run.id].kill()
        holders[run.id].wait()
    try:
        assert crash_dead_runs(layout, current) == [dead.name]
        with get_client(sync_client=True) as client:
            states = {run.id: client.read_flow_run(run.id).state for run in (dead, alive, finished)}
    finally:
        holders[alive.id].kill()
        holders[alive.id].wait()
    assert states[dead.id].is_crashed() and current.name in states[dead.id].message
    assert states[alive.id].is_running() and states[finished.id].is_completed()
    assert [p.stem for p in lock_path(layout, dead.id).parent.iterdir()] == [str(alive.id)]


@pytest.mark.slow  # a flow killed with -9, then a second run (~25 s): the fast suite measured 611 s
def test_a_killed_flow_run_is_marked_crashed_when_its_sweep_starts_again(prefect_harness, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out", ranks=[2], max_steps=2, checkpoint_steps=[2])
    data["render"].update(seeds=[1], samplers=["Euler a"], steps=[2], lora_weights=[1.0])
    spec_path = write_spec(tmp_path, data)
    root = tmp_path / "out" / "small"
    kill_when(start_flow(spec_path), lambda: (root / "spec.json").exists())  # the flow's first write

    state = lora_sweep(spec_path=str(spec_path), return_state=True)
    assert state.is_completed(), state.message
    new_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lora-sweep"])))
        [killed] = [r for r in runs if r.parameters.get("spec_path") == str(spec_path) and r.id != new_id]
        new = client.read_flow_run(new_id)
    assert killed.state.is_crashed(), killed.state
    assert new.name in killed.state.message and str(new.id) in killed.state.message
    assert not any((root / "flow-runs").iterdir())  # the dead run's lock removed, the new run's released at its end
