"""Successive halving against the full grid on the demo world: same winner, fewer training steps?

`python -m bench.halving [--out DIR] [--work DIR]`

Runs the `lora-sweep` flow twice on the demo world (builtin:tiny-sd15-world learning the "zqx" concept),
under a temporary Prefect server, over the same 12 configurations (6 learning rates x ranks 4 and 8, 200
steps, checkpoints at 50, 100 and 200, 64 px, batch 4; sweeps/demo-halving.toml's settings):
- the full grid: every run to step 200, every checkpoint rendered;
- `[search] strategy = "halving"`: rungs at steps 50 and 100, keep 1/3 (12 -> 4 -> 1), ranked by the
  concept score (the demo world's ground truth) of each rung's renders.
Ground truth for both is the concept score of a run's step-200 checkpoint (mean over its LoRA images). Prints
the grid's best configuration and score, the halving winner and its score, the training steps each spent
(counted from the `losses` rows, one per trained step) and wall times, and whether the halving winner's final
LoRA tensors are bit-identical to the grid's copy of that run. Writes halving.json and halving.md to --out.
tests/test_halving.py runs it (slow) and asserts the step budget and the winner.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "TQDM_DISABLE": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_name, _value)  # before torch, diffusers or prefect read them

import duckdb
import numpy as np
from safetensors.numpy import load_file

from tasks.lora.files import DIFFUSERS_FILE

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "sweeps" / "demo-halving.toml"
TOLERANCE = 0.05  # concept score (0 to 1): a different winner within this of the grid's best still counts
STEP_BUDGET = 0.40  # the halving sweep may train at most this fraction of the grid's steps
SCORES = """
SELECT i.run_id, r.learning_rate, r.rank, i.checkpoint_step AS step, avg(m.value) AS score
FROM image_metrics AS m JOIN images AS i USING (image_id) JOIN runs AS r USING (run_id)
WHERE m.metric = 'concept_score' AND i.checkpoint_id IS NOT NULL AND i.checkpoint_step = r.max_steps
GROUP BY ALL ORDER BY score DESC, i.run_id
"""


@dataclass(frozen=True)
class SweepFigures:
    """One sweep's outcome: its best run by the final concept score, the steps it trained, its wall time."""

    best_run: str
    best_config: str
    best_score: float
    steps_trained: int
    runs: int
    wall_s: float


@dataclass(frozen=True)
class Comparison:
    grid: SweepFigures
    halving: SweepFigures
    halving_winner_grid_score: float  # the halving winner's final concept score in the grid sweep
    step_fraction: float  # halving's trained steps / the grid's
    same_winner: bool
    within_tolerance: bool
    winner_weights_identical: bool  # the winner's final LoRA tensors equal the grid's copy of that run
    ladder: list[dict[str, object]]


def sweep_spec(output_dir: Path, halving: bool) -> Path:
    """sweeps/demo-halving.toml in `output_dir`'s folder, with output_dir set; without [search] for the grid."""
    text = SPEC.read_text()
    if not halving:
        text = text[:text.index("[search]")]
    text = text.replace('output_dir = "../outputs"', f"output_dir = {json.dumps(str(output_dir))}")
    text = text.replace('name = "demo-halving"', f'name = "{"demo-halving" if halving else "demo-grid"}"')
    path = output_dir.parent / f"{'halving' if halving else 'grid'}.toml"
    path.write_text(text)
    tomllib.loads(text)
    return path


def run_sweep(spec_path: Path) -> tuple[Path, float]:
    """The flow, timed; its sweep folder."""
    from flows.lora_sweep import lora_sweep

    start = time.perf_counter()
    summary = lora_sweep(spec_path=str(spec_path))
    wall = time.perf_counter() - start
    if not isinstance(summary, dict) or summary["failures"]:
        raise RuntimeError(f"sweep {spec_path} did not complete: {summary}")
    return Path(summary["sweep_root"]), wall


def figures(root: Path, wall: float, best_run: str | None = None) -> SweepFigures:
    """The sweep's best run (or `best_run`) by final concept score, and the steps it trained (losses rows)."""
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        scores = con.execute(SCORES).fetchall()
        steps, runs = con.execute("SELECT count(*), count(DISTINCT run_id) FROM losses").fetchone()
    chosen = next(row for row in scores if best_run is None or row[0] == best_run)
    run_id, lr, rank, _, score = chosen
    return SweepFigures(run_id, f"learning_rate {lr:g}, rank {rank}", float(score), int(steps), int(runs), wall)


def ladder_rows(root: Path) -> list[dict[str, object]]:
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        cursor = con.execute("SELECT l.rung, l.step, l.run_id, r.learning_rate, r.rank, round(l.value, 4) AS value, "
                             "l.place, l.decision FROM ladder AS l JOIN runs AS r USING (run_id) "
                             "ORDER BY l.rung, l.place NULLS LAST, l.run_id")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def final_lora(root: Path, run_id: str) -> dict[str, np.ndarray]:
    """The run's last checkpoint's tensors (the file's bytes also hold peft's config, whose target_modules is a
    set: its order changes from one process to the next)."""
    folders = sorted((root / "runs" / run_id / "checkpoints").iterdir())
    return load_file(str(folders[-1] / DIFFUSERS_FILE))


def same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def compare(work: Path, harness: bool = True) -> Comparison:
    """Both sweeps, halving first, each in its own output folder (a sibling sweep's finished runs would be
    used, not trained); under a temporary Prefect server unless the caller runs one (`harness=False`)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180) if harness else contextlib.nullcontext():
        halving_root, halving_wall = run_sweep(sweep_spec(_fresh(work / "halving" / "outputs"), halving=True))
        grid_root, grid_wall = run_sweep(sweep_spec(_fresh(work / "grid" / "outputs"), halving=False))
    ladder = ladder_rows(halving_root)
    winner = next(str(row["run_id"]) for row in ladder if row["decision"] == "best")
    grid = figures(grid_root, grid_wall)
    halving = figures(halving_root, halving_wall, best_run=winner)
    in_grid = figures(grid_root, grid_wall, best_run=winner).best_score
    return Comparison(grid, halving, in_grid, halving.steps_trained / grid.steps_trained, winner == grid.best_run,
                      grid.best_score - in_grid <= TOLERANCE,
                      same_tensors(final_lora(halving_root, winner), final_lora(grid_root, winner)), ladder)


def _fresh(folder: Path) -> Path:
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty; pass an empty --work folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def markdown(result: Comparison) -> str:
    g, h = result.grid, result.halving
    halving_steps = f"{h.steps_trained} ({result.step_fraction:.1%} of the grid's)"
    verdict = (f"Same winner: {result.same_winner}; within {TOLERANCE} of the grid's best: {result.within_tolerance}; "
               f"the winner's final LoRA tensors bit-identical to the grid's: {result.winner_weights_identical}.")
    lines = ["| sweep | best configuration | final concept score | steps trained | runs | wall time |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| full grid | {g.best_config} | {g.best_score:.3f} | {g.steps_trained} | {g.runs} | {g.wall_s:.0f} s |",
             f"| halving (keep 1/3) | {h.best_config} | {h.best_score:.3f} | {halving_steps} | {h.runs} | {h.wall_s:.0f} s |",
             "", verdict, "",
             "| rung | step | learning rate | rank | concept score | place | decision |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['rung']} | {r['step']} | {r['learning_rate']:g} | {r['rank']} | {r['value']} | {r['place']} | "
              f"{r['decision']} |" for r in result.ladder]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.halving", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="where halving.json/.md go")
    parser.add_argument("--work", default=None, help="an empty folder for both sweeps (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-halving-") as scratch:
        work = Path(args.work or scratch)
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
        result = compare(work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "halving.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    (out / "halving.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    ok = result.step_fraction <= STEP_BUDGET and result.within_tolerance and result.winner_weights_identical
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
