"""The `lora-sweep` flow: validate, train one LoRA per base model x dataset x training configuration
x rank, render each checkpoint's grid as soon as it is saved (flows/pipeline.py) with a live catalog and
report (flows/live.py), then build the final DuckDB catalog and HTML report, and the output folder's
history, catalog and index page (flows/output_index.py). Work another sweep in the same output folder
already finished is used where it is (flows/shared_work.py).

Final state: COMPLETED when every run and render succeeded. When some failed, everything else
still finishes (other runs, their renders, catalog and report, with the failures recorded as
data) and the flow then ends FAILED, naming what failed, so schedules and alerts notice. A file the
disk refuses at the end (manifest, catalog, report: full, read-only) also ends it FAILED, naming the
folder, instead of crashing it (docs/faults.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.execution import sweep_executor
from flows.halving import run_halving
from flows.live import LiveProgress
from flows.output_index import record_finished_sweep
from flows.pipeline import PipelineState, run_pipeline
from flows.render_outcomes import record_render_outcomes
from flows.shared_work import finished_elsewhere, rendered_elsewhere, roots_elsewhere
from flows.stale_runs import register_flow_run, release_flow_run_lock
from storage.atomic import write_atomic
from storage.catalog import Manifest, connect
from storage.history import SweepRecord, start_record
from storage.layout import SweepLayout
from tasks.prefect_tasks import catalog_task, load_spec_task, prepare_inputs_task, report_task
from tasks.sweep.devices import CONCURRENT_TASKS
from tasks.sweep.plan import planned_runs, render_jobs, sweep_root
from tasks.sweep.provenance import provenance
from tasks.sweep.spec import SweepSpec
from tasks.train.records import checkpoint_refs

# Whatever the run's end, its liveness lock goes (flows/stale_runs.py); a killed run's lock is freed by the kernel.
END_HOOKS = [release_flow_run_lock]


@flow(name="lora-sweep", task_runner=ThreadPoolTaskRunner(max_workers=CONCURRENT_TASKS), log_prints=True,
      on_completion=END_HOOKS, on_failure=END_HOOKS, on_cancellation=END_HOOKS, on_crashed=END_HOOKS)
def lora_sweep(spec_path: str = "sweeps/demo.toml"):
    """Run the sweep described by the TOML file at `spec_path` (relative to the working directory)."""
    logger = get_run_logger()
    started = time.perf_counter()
    spec_state = load_spec_task(spec_path, return_state=True)
    if spec_state.is_failed():  # the user's spec: one message naming every problem, no traceback
        return Failed(message=spec_state.message)
    spec = spec_state.result()
    inputs_state = prepare_inputs_task(spec, return_state=True)
    if inputs_state.is_failed():
        return Failed(message=inputs_state.message)
    inputs = inputs_state.result()
    layout = SweepLayout(sweep_root(spec))
    layout.root.mkdir(parents=True, exist_ok=True)
    register_flow_run(layout)  # earlier runs of this sweep whose process is gone: CRASHED on the server
    write_resolved_spec(layout, spec, spec_path)
    record = start_record(layout.root, spec.sweep_id(), spec.name, spec.model_dump(mode="json"))

    # work a sibling sweep under the same output_dir finished (same content id) is used where it is
    runs = finished_elsewhere(planned_runs(spec, inputs), spec.output_dir)
    refs = [ref for r in runs for ref in checkpoint_refs(r, SweepLayout(Path(r.sweep_root)))]
    jobs = rendered_elsewhere(render_jobs(spec, inputs.model_paths, refs, runs, inputs.dataset_path,
                                          inputs.caption_prompts), spec.output_dir)
    planned = Manifest(spec.sweep_id(), tuple(r.run_id for r in runs), tuple(j.render_id for j in jobs),
                       0.0 in spec.render.lora_weights, roots_elsewhere(runs, layout.root, "run_id"),
                       roots_elsewhere(jobs, layout.root, "render_id"))
    live = LiveProgress(layout, planned)
    live.start()
    with sweep_executor(spec.execution, len(runs)) as executor:  # threads, Dask, or workers (docs/scaling.md)
        if spec.search.strategy == "halving":  # rung by rung, the worse runs stopped (flows/halving.py)
            state = run_halving(executor, spec, runs, jobs, on_progress=live)
        else:
            state = run_pipeline(executor, runs, jobs, on_progress=live)  # checkpoints render as they are saved
    failures = pipeline_failures(state)
    submitted = state.submitted_jobs()  # a checkpoint a failed run never saved has no job
    failures += record_render_outcomes(layout, submitted, [state.render_futures[j.render_id] for j in submitted])
    manifest = replace(planned, render_ids=tuple(j.render_id for j in submitted),
                       render_roots=roots_elsewhere(submitted, layout.root, "render_id"))
    return finish_sweep(spec, layout, manifest, failures, started, logger, record)


def finish_sweep(spec: SweepSpec, layout: SweepLayout, manifest: Manifest, failures: list[str], started: float,
                 logger: logging.Logger | logging.LoggerAdapter, record: SweepRecord | None = None):
    """Manifest, catalog, report and artifacts, then the flow's final state. A step the disk refuses (full,
    read-only) becomes a failure naming it, and the steps that need it are skipped: never a crash."""
    try:
        manifest.write(layout)
    except OSError as err:
        return _failed([*failures, f"manifest {layout.root / 'manifest.json'}: {err}; no catalog or report was built"])
    catalog_state = catalog_task(str(layout.root), return_state=True)
    if not catalog_state.is_completed():
        return _failed([*failures, f"catalog {layout.catalog_path}: {catalog_state.message}; no report was built"])
    report_state = report_task(str(layout.root), return_state=True)
    report = report_state.result() if report_state.is_completed() else None
    if report is None:
        failures = [*failures, f"report {layout.report_dir}: {report_state.message}"]
    wall = time.perf_counter() - started
    summary = {"sweep_id": spec.sweep_id(), "sweep_root": str(layout.root), "catalog": catalog_state.result(),
               "report": report, "runs": len(manifest.run_ids), "render_jobs": len(manifest.render_ids),
               "failures": failures, "wall_time_s": round(wall, 1)}
    create_markdown_artifact(key="lora-sweep-summary", markdown=_summary_markdown(summary),
                             description=f"lora-sweep {spec.name}")
    if report is not None:
        create_link_artifact(key="lora-sweep-report", link=Path(report).resolve().as_uri(),
                             link_text=f"{spec.name} report", description="self-contained HTML report")
    best = best_configurations(layout)
    if best:
        create_table_artifact(key="lora-sweep-best", table=best, description="best LoRA checkpoint per metric")
    if record is not None:  # the output folder's history, catalog and index page (flows/output_index.py)
        failures = [*failures, *record_finished_sweep(record, layout, manifest, failures, report, best)]
        summary["failures"] = failures
    logger.info("sweep %s finished in %.1f s: report %s", spec.name, wall, report)
    return _failed(failures) if failures else summary


def _failed(failures: list[str]) -> State:
    return Failed(message=f"{len(failures)} part(s) of the sweep failed: " + "; ".join(failures))


def pipeline_failures(state: PipelineState) -> list[str]:
    """One message per training run and render job whose task did not complete."""
    failures = [f"training {r.run_id}: {state.train_futures[r.run_id].state.message}" for r in state.runs
                if not state.train_futures[r.run_id].state.is_completed()]
    return failures + [f"render {j.render_id}: {state.render_futures[j.render_id].state.message}"
                       for j in state.submitted_jobs() if not state.render_futures[j.render_id].state.is_completed()]


def best_configurations(layout: SweepLayout) -> list[dict[str, object]]:
    """Rows of the catalog's best_by_metric view, for the flow run's table artifact."""
    with connect(layout) as con:
        cursor = con.execute("SELECT b.metric, b.base_model, b.rank, b.checkpoint_step, "
                             "round(b.mean_value, 4) AS mean_value, r.learning_rate, r.alpha, r.variant, "
                             "r.dataset_name, b.run_id, b.kohya_path "
                             "FROM best_by_metric AS b LEFT JOIN runs AS r USING (run_id) ORDER BY b.metric")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def write_resolved_spec(layout: SweepLayout, spec, spec_path: str) -> None:
    """The resolved spec and its provenance beside the sweep's artifacts."""
    payload = {"sweep_id": spec.sweep_id(), "spec_path": str(Path(spec_path).resolve()),
               "spec": spec.model_dump(mode="json"), "provenance": provenance()}
    write_atomic(layout.spec_path, json.dumps(payload, indent=2).encode())


def _summary_markdown(summary: dict) -> str:
    lines = [f"# lora-sweep {summary['sweep_id']}", "",
             f"- report: `{summary['report']}`", f"- catalog: `{summary['catalog']}`",
             f"- runs: {summary['runs']}, render jobs: {summary['render_jobs']}",
             f"- wall time: {summary['wall_time_s']} s"]
    lines += [f"- FAILED: {f}" for f in summary["failures"]]
    return "\n".join(lines)
