"""A failed render job is data: the flow records every render job's outcome as a `renders` row,
the report lists the failed ones (and says so in its summary), and a later success replaces them."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tasks.render.job as render_module
from tests.conftest import small_sweep_data, write_spec


@pytest.mark.slow  # two flow runs (~22 s): the fast suite passed its 10-minute budget
def test_a_failed_baseline_render_is_listed_in_the_report_until_it_renders(prefect_harness, tmp_path: Path,
                                                                          monkeypatch) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out", ranks=[2], max_steps=2, checkpoint_steps=[2])
    data["render"].update(seeds=[1], samplers=["Euler a"], steps=[2], lora_weights=[1.0])
    spec_path = str(write_spec(tmp_path, data))
    real_render_job = render_module.render_job

    def baseline_fails(job):
        if job.checkpoint is None:
            raise OSError(28, "No space left on device (in the test)")
        return real_render_job(job)

    monkeypatch.setattr(render_module, "render_job", baseline_fails)
    state = lora_sweep(spec_path=spec_path, return_state=True)
    root = tmp_path / "out" / "small"
    rows = {r["render_id"]: r for f in (root / "tables" / "renders").glob("*.parquet")
            for r in pq.read_table(f).to_pylist()}
    [baseline] = [r for r in rows.values() if r["run_id"] is None]
    assert state.is_failed() and f"render {baseline['render_id']}" in state.message
    assert baseline["status"] == "failed" and "No space left on device" in baseline["error"]
    assert [r["status"] for r in rows.values() if r["run_id"]] == ["completed"]
    report = (root / "report" / "index.html").read_text()
    assert "1 render job(s) failed" in report
    failed_section = report.split('id="failed-renders"')[1].split("</section>")[0]
    assert baseline["render_id"] in failed_section and "No space left on device" in failed_section
    assert not any((root / "flow-runs").iterdir())  # a failed run lets go of its liveness lock too

    monkeypatch.setattr(render_module, "render_job", real_render_job)
    assert lora_sweep(spec_path=spec_path, return_state=True).is_completed()
    assert pq.read_table(root / "tables" / "renders" / f"{baseline['render_id']}.parquet")["status"].to_pylist() == [
        "completed"]
    assert 'id="failed-renders"' not in (root / "report" / "index.html").read_text()
