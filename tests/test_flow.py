"""The lora-sweep flow end to end under a Prefect test harness: exact row counts, catalog and report."""

from __future__ import annotations

import math
import os
import signal
import tomllib
from pathlib import Path

import duckdb
import pytest

from tests.conftest import small_sweep_data


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect server for the whole session (starting one costs ~12 s)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # a killed pytest must not leave the harness server running
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_spec(tmp_path: Path, data: dict) -> Path:
    lines = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)
            elif _is_table_list(v):
                for item in v:
                    lines.append(f"[[{k}]]")
                    lines.extend(f"{ik} = {_toml(iv)}" for ik, iv in item.items())

    emit("", data)
    path = tmp_path / "sweep.toml"
    path.write_text("\n".join(lines) + "\n")
    assert tomllib.loads(path.read_text()) == data
    return path


def _is_table_list(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)


def _toml(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(i) for i in v) + "]"
    return repr(v)


def test_flow_runs_end_to_end_with_expected_rows(prefect_harness, tmp_path: Path) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out")
    spec_path = write_spec(tmp_path, data)
    summary = lora_sweep(spec_path=str(spec_path))
    assert summary["failures"] == []
    root = Path(summary["sweep_root"])

    t, r = data["training"], data["render"]
    axes = [len(t["ranks"]), len(t["checkpoint_steps"]), len(r["samplers"]), len(r["steps"]),
            len(r["lora_weights"]), len(r["cfg_scales"]), len(r["prompts"]), len(r["seeds"])]
    per_baseline = math.prod([len(r["samplers"]), len(r["steps"]), len(r["cfg_scales"]), len(r["prompts"]),
                              len(r["seeds"])])
    nonzero = len([w for w in r["lora_weights"] if w != 0.0])
    rendered = per_baseline + len(t["ranks"]) * len(t["checkpoint_steps"]) * per_baseline * nonzero

    con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM grid").fetchone()[0] == math.prod(axes)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == rendered
    assert con.execute("SELECT count(*) FROM runs WHERE status = 'completed'").fetchone()[0] == len(t["ranks"])
    assert con.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == len(t["ranks"]) * len(t["checkpoint_steps"])
    assert con.execute("SELECT count(*) FROM losses").fetchone()[0] == len(t["ranks"]) * t["max_steps"]
    paths = [row[0] for row in con.execute("SELECT DISTINCT path FROM grid").fetchall()]
    con.close()
    assert len(paths) == rendered and all(Path(p).is_file() for p in paths)
    assert Path(summary["report"]).is_file()

    # Re-running the same spec finds every run and image already done.
    mtimes = {p: Path(p).stat().st_mtime_ns for p in paths}
    again = lora_sweep(spec_path=str(spec_path))
    assert again["failures"] == []
    assert {p: Path(p).stat().st_mtime_ns for p in paths} == mtimes


def test_flow_fails_before_any_work_on_bad_spec(prefect_harness, tmp_path: Path) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out")
    data["training"]["ranks"] = [0]
    data["render"]["samplers"] = ["Eulr a"]
    spec_path = write_spec(tmp_path, data)
    state = lora_sweep(spec_path=str(spec_path), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception) as info:
        state.result()
    assert "training.ranks" in str(info.value) and "Eulr a" in str(info.value)
    assert not (tmp_path / "out").exists()
