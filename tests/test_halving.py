"""Adaptive sweeps: `[search] strategy = "halving"` checked before work, runs stopped at rungs and resumed
bit-identically, decisions written to the ladder and reached again by a re-run, and (slow) the bench's
winner and step budget against the full grid."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from flows.halving import decide, steps_trained
from tasks.lora.files import DIFFUSERS_FILE
from tasks.preflight import prepare_inputs
from tasks.sweep.load import SpecError, load_spec, parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.sweep.search_spec import METRICS, halving_steps
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data, write_spec

REPO = Path(__file__).resolve().parent.parent
HALVING = {"strategy": "halving", "rungs": [4, 8], "keep": "1/2", "metric": "validation_loss"}


def halving_data(out: Path, search: dict | None = None, **training: object) -> dict:
    """Four runs (4 learning rates x rank 2) with checkpoints at 4, 8 and 12 and held-out images."""
    settings = {"ranks": [2], "learning_rate": [1e-4, 1e-3, 1e-2, 3e-2], "max_steps": 12,
                "checkpoint_steps": [4, 8, 12], "validation_images": 2, **training}
    data = small_sweep_data(out, **settings)
    data["render"].update(steps=[2], samplers=["Euler a"], lora_weights=[1.0], seeds=[1])
    data["search"] = {**HALVING, **(search or {})}
    return data


def refused(data: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    return str(err.value)


@pytest.mark.parametrize(("search", "training", "expected"), [
    ({"rungs": [5, 8]}, {}, "search.rungs [5] are not checkpoint steps; allowed: steps from [4, 8, 12]"),
    ({"rungs": [4, 12]}, {}, "search.rungs [12] are not below max_steps 12"),
    ({"rungs": [8, 4]}, {}, "search.rungs [8, 4] are not increasing"),
    ({"keep": "1/5"}, {}, "search.keep '1/5' keeps nothing at rung 1 (step 4): 0 of 4 runs"),
    ({"keep": [3, 3]}, {}, "search.keep [3, 3] keeps everything at rung 2 (step 8): 3 of 3 runs"),
    ({"keep": 4}, {}, "search.keep 4 keeps everything at rung 1 (step 4): 4 of 4 runs"),
    ({"keep": 0}, {}, "keep = 0 keeps nothing"),
    ({"keep": 1.5}, {}, "keep = 1.5; allowed: a fraction kept at every rung between 0 and 1"),
    ({"keep": [2]}, {}, "search.keep [2] has 1 counts for 2 rungs; allowed: one count per rung"),
    ({"keep": "1/3"}, {}, "search.keep '1/3' leaves 1 run at rung 2 (step 8): nothing to compare"),
    ({"metric": "sharpness"}, {}, "search.metric 'sharpness' is not a metric; allowed: validation_loss,"),
    ({}, {"validation_images": 0}, "search.metric 'validation_loss' needs training.validation_images above 0"),
    ({"metric": "concept_score"}, {}, None),  # the demo world: allowed
    ({"metric": "clip_text_image_score"}, {}, "search.metric 'clip_text_image_score' needs a CLIP model"),
    ({"metric": "caption_ssim"}, {}, "search.metric 'caption_ssim' scores caption prompts"),
    ({"strategy": "halving", "rungs": []}, {}, "search.rungs is missing"),
])
def test_bad_search_is_refused_before_work(tmp_path: Path, search: dict, training: dict, expected: str | None) -> None:
    data = halving_data(tmp_path, search, **training)
    if expected is None:
        parse_spec(data)
    else:
        assert expected in refused(data)


def test_search_options_without_halving_and_image_metrics_without_lora_images_are_refused(tmp_path: Path) -> None:
    data = halving_data(tmp_path)
    data["search"] = {"rungs": [4]}
    assert "search.rungs only apply to strategy = 'halving'" in refused(data)
    data = halving_data(tmp_path, {"metric": "concept_score"})
    data["render"]["lora_weights"] = [0.0]
    assert "render.lora_weights [0.0] has no weight other than 0" in refused(data)
    data = halving_data(tmp_path, {"metric": "concept_score"})
    data["dataset"] = {"path": str(tmp_path), "trigger_word": "zqx"}
    assert "search.metric 'concept_score' is the demo world's ground truth" in refused(data)


def test_the_schedule_keeps_floor_of_each_fraction_and_counts_its_steps() -> None:
    spec = load_spec(REPO / "sweeps" / "demo-halving.toml")
    counts = spec.search.schedule(12)
    assert counts == [12, 4, 1]
    assert halving_steps(counts, spec.search.rungs, 200) == 8 * 50 + 3 * 100 + 200
    assert halving_steps(counts, spec.search.rungs, 200) / (12 * 200) <= 0.40
    assert spec.search.model_copy(update={"keep": (6, 2)}).schedule(12) == [12, 6, 2]
    assert spec.search.model_copy(update={"keep": 0.5}).schedule(12) == [12, 6, 3]
    assert spec.search.higher_is_better() and spec.search.renders_rungs()


def test_a_grid_sweep_keeps_its_ids_and_halving_changes_no_run_id(tmp_path: Path) -> None:
    plain = small_sweep_data(tmp_path, learning_rate=[1e-3, 2e-3], validation_images=2)
    grid = {**plain, "search": {"strategy": "grid"}}
    assert parse_spec(grid).sweep_id() == parse_spec(plain).sweep_id()
    halving = {**plain, "search": {"strategy": "halving", "rungs": [6], "keep": 2, "metric": "validation_loss"}}
    assert parse_spec(halving).sweep_id() != parse_spec(plain).sweep_id()
    inputs = prepare_inputs(parse_spec(plain))
    ids = [[r.run_id for r in training_runs(parse_spec(d), inputs.model_paths, inputs.dataset_path,
                                            inputs.dataset_fingerprint)] for d in (plain, halving)]
    assert ids[0] == ids[1]
    run = training_runs(parse_spec(plain), inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    assert run.model_copy(update={"stop_at": 6}).run_id == run.run_id


def test_every_rankable_metric_is_the_score_registrys_with_its_direction() -> None:
    from tasks.score import caption_fidelity, clip_metrics
    from tasks.score.job import CONCEPT_METRIC
    from tasks.score.metrics import GROUP_METRICS
    from tasks.score.metrics import METRICS as IMAGE_METRICS

    registry = {name: m.higher_is_better for name, m in {**IMAGE_METRICS, **GROUP_METRICS}.items()}
    registry |= {CONCEPT_METRIC: True, clip_metrics.TEXT_IMAGE_METRIC: True, clip_metrics.TRAINING_METRIC: False,
                 **caption_fidelity.HIGHER_IS_BETTER, "validation_loss": False}
    assert {name: higher for name, (higher, _) in METRICS.items()} == registry


def run_of(values: list[float | None]) -> tuple[list[TrainingRunSpec], dict[str, float | None]]:
    runs = [TrainingRunSpec.model_construct(run_id=f"run-{i}", max_steps=12) for i in range(len(values))]
    return runs, {r.run_id: v for r, v in zip(runs, values, strict=True)}


def test_decisions_rank_by_value_break_ties_by_run_id_and_put_nan_last() -> None:
    runs, values = run_of([0.5, 0.2, 0.2, math.nan, None])
    got = {d.run_id: (d.place, d.decision) for d in decide(runs, values, False, 1, 4, 2, final=False)}
    assert got == {"run-1": (1, "promoted"), "run-2": (2, "promoted"), "run-0": (3, "pruned"),
                   "run-3": (4, "pruned"), "run-4": (None, "failed")}
    got = {d.run_id: d.decision for d in decide(runs, values, True, 1, 4, 2, final=False)}
    assert got["run-0"] == "promoted" and got["run-1"] == "promoted" and got["run-2"] == "pruned"
    final = decide(runs[:2], values, False, 3, None, 1, final=True)
    assert [(d.run_id, d.step, d.decision) for d in final] == [("run-1", 12, "best"), ("run-0", 12, "finished")]
    assert steps_trained([{"run_id": "a", "step": 4}, {"run_id": "a", "step": 8}, {"run_id": "b", "step": 4}]) == 12


def test_a_stop_at_that_is_no_checkpoint_step_is_refused_before_training(tmp_path: Path) -> None:
    spec = parse_spec(small_sweep_data(tmp_path, ranks=[2]))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    with pytest.raises(ValueError, match=r"stop_at 5 is not one of its checkpoint steps \[6, 12\]"):
        train_lora(run.model_copy(update={"stop_at": 5}))
    assert not (tmp_path / "small" / "runs").exists()


def test_each_rung_of_a_deployment_run_is_its_own_flow_run(monkeypatch, tmp_path: Path) -> None:
    from tasks.train import remote

    calls = []

    class Child:
        name, state = "child", None

    monkeypatch.setattr(remote, "run_deployment", lambda *a, **kw: calls.append(kw) or Child())
    monkeypatch.setattr(remote, "write_run_row", lambda *a, **kw: None)
    spec = parse_spec(small_sweep_data(tmp_path, ranks=[2]))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    for stop in (6, None):
        with pytest.raises(remote.TrainingFailed):
            remote.train_via_deployment(run.model_copy(update={"stop_at": stop}), "lora-train/train-run")
    keys = [c["idempotency_key"] for c in calls]
    assert keys[0].endswith(f"{run.run_id}@6") and keys[1].endswith(run.run_id) and keys[0] != keys[1]
    assert calls[0]["parameters"]["run"]["stop_at"] == 6


def test_a_run_stopped_at_each_rung_ends_bit_identical_to_one_trained_straight_through(tmp_path: Path) -> None:
    def run_in(folder: Path) -> TrainingRunSpec:
        spec = parse_spec(small_sweep_data(folder, ranks=[2], max_steps=18, checkpoint_steps=[6, 12, 18],
                                           validation_images=2))
        inputs = prepare_inputs(spec)
        return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]

    straight, laddered = run_in(tmp_path / "straight"), run_in(tmp_path / "ladder")
    assert straight.run_id == laddered.run_id
    root = Path(laddered.sweep_root)
    first = train_lora(laddered.model_copy(update={"stop_at": 6}))
    assert first.status == "stopped" and [c.step for c in first.checkpoints] == [6]
    assert not (root / "runs" / laddered.run_id / "checkpoints" / "step-000012").exists()
    assert pq.read_table(root / "tables" / "runs" / f"{laddered.run_id}.parquet")["status"].to_pylist() == ["stopped"]
    saved = {p: p.stat().st_mtime_ns for p in Path(first.checkpoints[0].lora_dir).iterdir()}
    assert train_lora(laddered.model_copy(update={"stop_at": 6})).checkpoints == first.checkpoints  # not retrained
    train_lora(laddered.model_copy(update={"stop_at": 12}))
    done = train_lora(laddered)
    assert done.status == "completed" and [c.step for c in done.checkpoints] == [6, 12, 18]
    assert {p: p.stat().st_mtime_ns for p in saved} == saved

    reference = train_lora(straight)
    a = load_file(str(Path(done.checkpoints[-1].lora_dir) / DIFFUSERS_FILE))
    b = load_file(str(Path(reference.checkpoints[-1].lora_dir) / DIFFUSERS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [pq.read_table(Path(r.sweep_root) / "tables" / t / f"{r.run_id}.parquet").drop(["sweep_id"]).to_pylist()
              for r in (laddered, straight) for t in ("losses", "checkpoints")]
    assert losses[0] == losses[2] and [row["step"] for row in losses[0]] == list(range(1, 19))
    assert [(c["step"], c["validation_loss"]) for c in losses[1]] == [(c["step"], c["validation_loss"]) for c in losses[3]]


def ladder_of(root: Path) -> list[tuple]:
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        return con.execute("SELECT run_id, rung, step, value, place, competitors, kept, decision FROM ladder "
                           "ORDER BY rung, place NULLS LAST, run_id").fetchall()


@pytest.mark.slow  # a 4-run halving sweep through the flow, then its re-run: ~5 min on 2 busy cores
def test_a_halving_sweep_prunes_at_rungs_and_a_rerun_reaches_the_same_decisions(prefect_harness, tmp_path: Path
                                                                                ) -> None:
    from flows.lora_sweep import lora_sweep

    spec_path = write_spec(tmp_path, halving_data(tmp_path / "out"))
    summary = lora_sweep(spec_path=str(spec_path))
    assert summary["failures"] == []
    root = Path(summary["sweep_root"])
    ladder = ladder_of(root)
    assert [(rung, len([r for r in ladder if r[1] == rung])) for rung in (1, 2, 3)] == [(1, 4), (2, 2), (3, 1)]
    assert [r[7] for r in ladder] == ["promoted", "promoted", "pruned", "pruned", "promoted", "pruned", "best"]
    assert [r[3] for r in ladder[:4]] == sorted(r[3] for r in ladder[:4])  # lowest validation loss first
    furthest = {r[0]: r[2] for r in ladder}
    with duckdb.connect(str(root / "catalog.duckdb"), read_only=True) as con:
        trained = dict(con.execute("SELECT run_id, count(*) FROM losses GROUP BY run_id").fetchall())
        rendered = con.execute("SELECT count(DISTINCT checkpoint_id) FROM images WHERE run_id IS NOT NULL").fetchone()
        status = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    assert trained == furthest and sum(trained.values()) == 2 * 4 + 1 * 8 + 1 * 12  # of the grid's 4 x 12
    assert rendered == (4 + 2 + 1,)  # every saved checkpoint, pruned runs' too
    assert sorted(status.values()) == ["completed", "stopped", "stopped", "stopped"]
    page = (root / "report" / "index.html").read_text()
    assert 'id="ladder"' in page and "<b>28</b> training steps against 48" in page

    # As if killed during the winner's last stretch: its final checkpoint, rows and the ladder are gone.
    import shutil

    winner = ladder[-1][0]
    last = root / "runs" / winner / "checkpoints" / "step-000012"
    final = load_file(str(last / DIFFUSERS_FILE))
    shutil.rmtree(last)
    for table in ("runs", "losses", "checkpoints"):
        (root / "tables" / table / f"{winner}.parquet").unlink()
    (root / "tables" / "ladder" / f"{summary['sweep_id']}.parquet").unlink()
    kept = {p: p.stat().st_mtime_ns for p in root.glob("runs/*/checkpoints/*/*")}
    images = {p: p.stat().st_mtime_ns for p in root.glob("images/*/*.png")}
    again = lora_sweep(spec_path=str(spec_path))
    assert again["failures"] == []
    assert ladder_of(root) == ladder
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing retrained but the lost stretch
    assert {p: p.stat().st_mtime_ns for p in images} == images  # same checkpoint ids: no image rendered again
    retrained = load_file(str(last / DIFFUSERS_FILE))
    assert retrained.keys() == final.keys() and all(torch.equal(retrained[k], final[k]) for k in final)


@pytest.mark.slow  # both demo-world sweeps of bench/halving.py through the flow: ~10 min on 2 cores
def test_the_bench_halving_sweep_finds_the_grids_winner_within_the_step_budget(prefect_harness, tmp_path: Path) -> None:
    from bench.halving import STEP_BUDGET, compare

    result = compare(tmp_path, harness=False)
    assert result.grid.steps_trained == 12 * 200
    assert result.step_fraction <= STEP_BUDGET
    assert result.within_tolerance, (result.grid, result.halving)
    assert result.winner_weights_identical
