"""Successive halving (`[search] strategy = "halving"`): stop the worse runs at each rung, train the rest on.

Every run trains to the first rung (a checkpoint step; the run spec's `stop_at`, so its id and weights are
those of the full run), its metric is read (the validation loss from its `checkpoints` row, or an image
metric after the rung's checkpoints render and score), and the best `keep` resume from that checkpoint to
the next rung; the others stop there, pruned, keeping their checkpoints. The last rung's survivors train
to max_steps and are compared once more. Each decision is a `ladder` row (storage.schema.LADDER).

Decisions come only from recorded metrics of saved checkpoints, so a killed sweep re-run finds every
checkpoint, render and score on disk and reaches the same decisions without retraining anything.
Training and rendering go through the sweep's executor, so threads, Dask and the training deployment
all work. Finally every saved checkpoint not yet rendered renders (pruned runs' too: they are data).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from prefect.futures import PrefectFuture

from flows.execution import SweepExecutor
from flows.pipeline import PipelineState
from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.lora.files import checkpoint_complete
from tasks.sweep.ids import checkpoint_id
from tasks.sweep.plan import RenderJobSpec, TrainingRunSpec, sweep_root
from tasks.sweep.search_spec import VALIDATION_METRIC, SearchSpec
from tasks.sweep.spec import SweepSpec

POLL_S = 0.5  # how often running tasks are checked
Progress = Callable[[PipelineState], None] | None


@dataclass(frozen=True)
class Decision:
    """One run's outcome at one rung: a `ladder` row less the sweep id."""

    run_id: str
    rung: int
    step: int
    value: float | None
    place: int | None
    competitors: int
    kept: int
    decision: str


def run_halving(executor: SweepExecutor, spec: SweepSpec, runs: list[TrainingRunSpec], jobs: list[RenderJobSpec],
                on_progress: Progress = None) -> PipelineState:
    """Train `runs` rung by rung, keeping the best at each; returns the state the flow's finishing code reads
    (each run's latest training future, every render submitted)."""
    search, layout = spec.search, SweepLayout(sweep_root(spec))
    state = PipelineState(runs, jobs)
    job_of = {j.checkpoint.checkpoint_id: j for j in jobs if j.checkpoint is not None}
    baselines = [j for j in jobs if j.checkpoint is None]
    submit_renders(executor, state, baselines)
    ladder: list[Decision] = []
    alive = list(runs)
    for index, step in enumerate([*search.rungs, None]):
        trained = train_to(executor, state, alive, step, on_progress)
        if search.renders_rungs():
            wait_for(state, [state.render_futures[j.render_id] for j in baselines], on_progress)
            rung_jobs = [job_of[checkpoint_id(r.run_id, step or r.max_steps)] for r in trained]
            wait_for(state, submit_renders(executor, state, rung_jobs), on_progress)
        values = {r.run_id: metric_value(search, r, step or r.max_steps, job_of) for r in trained}
        final = step is None
        kept = 1 if final else search.kept(len(alive), index)
        decisions = decide(alive, values, search.higher_is_better(), index + 1, step, kept, final)
        ladder += decisions
        write_ladder(layout, spec, ladder)
        promoted = {d.run_id for d in decisions if d.decision == "promoted"}
        alive = [r for r in alive if r.run_id in promoted]
        if not alive:
            break
    rest = [j for j in jobs if j.checkpoint is not None and j.render_id not in state.render_futures
            and checkpoint_complete(Path(j.checkpoint.lora_dir))]
    wait_for(state, [state.render_futures[j.render_id] for j in baselines], on_progress)
    wait_for(state, submit_renders(executor, state, rest), on_progress)
    return state


def train_to(executor: SweepExecutor, state: PipelineState, runs: list[TrainingRunSpec], step: int | None,
             on_progress: Progress) -> list[TrainingRunSpec]:
    """Train each run up to checkpoint `step` (None: max_steps) and wait; the runs whose training completed."""
    calls = [r.model_copy(update={"stop_at": step}) for r in runs]
    futures = executor.train(calls)
    for run, future in zip(runs, futures, strict=True):
        state.train_futures[run.run_id] = future
        state.finished.discard(run.run_id)
    wait_for(state, futures, on_progress)
    return [r for r, f in zip(runs, futures, strict=True) if f.state.is_completed()]


def submit_renders(executor: SweepExecutor, state: PipelineState, jobs: Sequence[RenderJobSpec]) -> list[PrefectFuture]:
    """Submit the jobs not submitted yet; the futures of all of `jobs`."""
    new = [j for j in jobs if j.render_id not in state.render_futures]
    for job, future in zip(new, executor.render(new), strict=True):
        state.render_futures[job.render_id] = future
    return [state.render_futures[j.render_id] for j in jobs]


def wait_for(state: PipelineState, futures: Sequence[PrefectFuture], on_progress: Progress) -> None:
    """Block until every future is final, marking finished tasks and reporting progress as they end."""
    while True:
        by_key = {**state.train_futures, **state.render_futures}
        newly = [k for k, f in by_key.items() if k not in state.finished and f.state.is_final()]
        state.finished.update(newly)
        if newly and on_progress is not None:
            on_progress(state)
        if all(f.state.is_final() for f in futures):
            return
        time.sleep(POLL_S)


def metric_value(search: SearchSpec, run: TrainingRunSpec, step: int, job_of: dict[str, RenderJobSpec]
                 ) -> float | None:
    """The run's recorded metric at `step`: its checkpoint's validation loss, or the mean of the metric over
    the checkpoint's rendered images (as the catalog's best_by_metric view ranks checkpoints). None: not there."""
    if search.metric == VALIDATION_METRIC:
        path = SweepLayout(Path(run.sweep_root)).row_file("checkpoints", run.run_id)
        rows = pq.read_table(path, columns=["step", "validation_loss"]).to_pylist() if path else []
        return next((row["validation_loss"] for row in rows if row["step"] == step), None)
    job = job_of[checkpoint_id(run.run_id, step)]
    path = SweepLayout(Path(job.sweep_root)).table_file("image_metrics", job.render_id)
    if not path.exists():
        return None
    values = [row["value"] for row in pq.read_table(path, columns=["metric", "value"]).to_pylist()
              if row["metric"] == search.metric and row["value"] is not None]
    return sum(values) / len(values) if values else None


def decide(runs: list[TrainingRunSpec], values: dict[str, float | None], higher_is_better: bool, rung: int,
           step: int | None, kept: int, final: bool) -> list[Decision]:
    """Rank the runs by value (NaN last, ties to the smaller run id) and decide each: the best `kept` are
    promoted, the rest pruned; at the final comparison the first is "best" and the rest "finished". A run with
    no value (its training or scoring failed) is "failed". `kept` is held between 1 and the runs with a value."""
    valued = [r for r in runs if values.get(r.run_id) is not None]
    sign = -1.0 if higher_is_better else 1.0
    order = sorted(valued, key=lambda r: (math.isnan(values[r.run_id]), sign * values[r.run_id], r.run_id))
    kept = min(max(kept, 1), len(order))
    decisions = []
    for place, run in enumerate(order, start=1):
        if final:
            what = "best" if place == 1 else "finished"
        else:
            what = "promoted" if place <= kept else "pruned"
        decisions.append(Decision(run.run_id, rung, step or run.max_steps, values[run.run_id], place, len(runs),
                                  kept, what))
    decisions += [Decision(r.run_id, rung, step or r.max_steps, None, None, len(runs), kept, "failed")
                  for r in runs if values.get(r.run_id) is None]
    return decisions


def write_ladder(layout: SweepLayout, spec: SweepSpec, ladder: list[Decision]) -> Path:
    """The whole ladder so far as the sweep's one `ladder` file (replaced atomically after each rung)."""
    higher = spec.search.higher_is_better()
    rows = [{"sweep_id": spec.sweep_id(), "run_id": d.run_id, "rung": d.rung, "step": d.step,
             "metric": spec.search.metric, "value": d.value, "higher_is_better": higher, "place": d.place,
             "competitors": d.competitors, "kept": d.kept, "decision": d.decision} for d in ladder]
    return write_rows("ladder", rows, layout.table_file("ladder", spec.sweep_id()))


def steps_trained(ladder: list[dict[str, object]]) -> int:
    """Training steps the ladder spent: each run's furthest compared step, summed."""
    furthest: dict[str, int] = {}
    for row in ladder:
        furthest[str(row["run_id"])] = max(furthest.get(str(row["run_id"]), 0), int(row["step"]))
    return sum(furthest.values())
