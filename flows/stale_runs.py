"""Flow runs of a sweep whose process died: marked CRASHED on the server when the sweep starts again.

A flow run killed with SIGKILL (or with its machine) never reports a final state, so the Prefect
server shows it RUNNING forever. Prefect 3.8.8 emits flow-run heartbeat events but acts on missing
ones only through an automation the user creates (measured here: CRASHED 50 s after the kill with
the shortest heartbeat allowed, 30 s; minutes with the default 180 s). So each `lora-sweep` run
also holds a lock of its own in the sweep folder, `flow-runs/<flow run id>.lock`, while its
process lives (tasks.sweep.claims: the kernel drops it when the process dies, on any machine
sharing the folder). When a run of the same sweep starts, a lock that nobody holds belongs to a
dead run: if the server still shows that run RUNNING, it is set CRASHED with a message naming
the new run. The lock is released and its file removed when the run ends (the flow's state hooks).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

from prefect import Flow, get_run_logger
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from storage.layout import SweepLayout
from tasks.sweep.claims import holder_is_gone, open_lock, take_lock

FLOW_RUNS_DIR = "flow-runs"
_HELD_LOCKS: dict[UUID, tuple[int, Path]] = {}  # flow run id -> its lock's descriptor and file, in this process


def register_flow_run(layout: SweepLayout) -> list[str]:
    """Hold this flow run's lock in the sweep folder and mark the sweep's dead runs CRASHED; their names."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return []
    hold_flow_run_lock(layout, context.flow_run)
    crashed = crash_dead_runs(layout, context.flow_run)
    for name in crashed:
        get_run_logger().warning("flow run %r of this sweep had died while RUNNING: marked CRASHED", name)
    return crashed


def lock_path(layout: SweepLayout, flow_run_id: UUID) -> Path:
    return layout.root / FLOW_RUNS_DIR / f"{flow_run_id}.lock"


def hold_flow_run_lock(layout: SweepLayout, flow_run: FlowRun) -> Path:
    """Take this flow run's liveness lock, held until `release_flow_run_lock` or the process's end."""
    if flow_run.id in _HELD_LOCKS:  # a retry of the run in the same process: it holds the lock already
        return _HELD_LOCKS[flow_run.id][1]
    path = lock_path(layout, flow_run.id)
    pending = path.with_suffix(".pending")
    fd = open_lock(pending)
    take_lock(fd, f"flow run {flow_run.name}")  # its own file: never waits
    os.replace(pending, path)  # the lock appears already held: a starting run never looks dead
    _HELD_LOCKS[flow_run.id] = (fd, path)
    return path


def release_flow_run_lock(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """State hook of the sweep flow: remove the run's lock file, then let go of the lock."""
    fd, path = _HELD_LOCKS.pop(flow_run.id, (None, None))
    if fd is None:
        return
    path.unlink(missing_ok=True)  # before closing: a lock seen free is a lock of a finished run
    os.close(fd)


def crash_dead_runs(layout: SweepLayout, current: FlowRun) -> list[str]:
    """Mark CRASHED every RUNNING flow run of this sweep whose process is gone; their names.

    A dead run's lock file is removed whatever the server says of it (finished, or unknown to
    this server), so the folder only lists runs that may still be alive.
    """
    crashed = []
    with get_client(sync_client=True) as client:
        for path in sorted((layout.root / FLOW_RUNS_DIR).glob("*.lock")):
            flow_run_id = parse_flow_run_id(path)
            if flow_run_id is None or flow_run_id == current.id or not holder_is_gone(path):
                continue
            name = mark_crashed(client, flow_run_id, current, holder=path.read_text(errors="replace").strip())
            crashed += [name] if name else []
            path.unlink(missing_ok=True)
    return crashed


def parse_flow_run_id(path: Path) -> UUID | None:
    try:
        return UUID(path.stem)
    except ValueError:  # not a lock this module wrote
        return None


def mark_crashed(client: SyncPrefectClient, flow_run_id: UUID, current: FlowRun, holder: str) -> str | None:
    """Set the dead flow run CRASHED if the server still shows it RUNNING; its name, or None."""
    try:
        run = client.read_flow_run(flow_run_id)
    except ObjectNotFound:  # a run of another Prefect server sharing the output folder
        return None
    if run.state is None or not run.state.is_running():
        return None
    found = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    message = (f"the process of this flow run is gone (killed, or its machine stopped) without a final state; "
               f"found at {found} by flow run {current.name!r} ({current.id}) of the same sweep, which no longer "
               f"saw this run hold its lock in the sweep folder (holder was {holder or 'unknown'})")
    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
    return run.name
