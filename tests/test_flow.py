"""The lora-sweep flow end to end under a Prefect test harness: exact row counts, catalog and report."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import duckdb
import pytest

from storage.atomic import current_umask
from tasks.render.png_metadata import parse_parameters, read_png_parameters
from tests.conftest import small_sweep_data, write_spec

REPO = Path(__file__).resolve().parent.parent
COOKBOOK = sorted((REPO / "storage" / "cookbook").glob("*.sql"))


@pytest.fixture(scope="module")
def demo_sweep(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """The shipped demo spec, run for real by the flow into a temporary output folder."""
    from flows.lora_sweep import lora_sweep

    tmp = tmp_path_factory.mktemp("demo")
    text = (REPO / "sweeps" / "demo.toml").read_text()
    spec_path = tmp / "demo.toml"
    spec_path.write_text(text.replace('output_dir = "../outputs"', f'output_dir = "{tmp / "out"}"'))
    data = tomllib.loads(spec_path.read_text())
    summary = lora_sweep(spec_path=str(spec_path))
    return summary, data, spec_path


def query(summary: dict, sql: str) -> list[tuple]:
    with duckdb.connect(str(Path(summary["sweep_root"]) / "catalog.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_demo_flow_completes_with_rows_equal_to_the_grid_product(demo_sweep) -> None:
    summary, data, _ = demo_sweep
    assert summary["failures"] == []
    t, r = data["training"], data["render"]
    axes = [len(t["ranks"]), len(t["checkpoint_steps"]), len(r["samplers"]), len(r["steps"]),
            len(r["lora_weights"]), len(r["cfg_scales"]), len(r["prompts"]), len(r["seeds"])]
    per_baseline = math.prod([len(r["samplers"]), len(r["steps"]), len(r["cfg_scales"]), len(r["prompts"]),
                              len(r["seeds"])])
    nonzero = len([w for w in r["lora_weights"] if w != 0.0])
    rendered = per_baseline + len(t["ranks"]) * len(t["checkpoint_steps"]) * per_baseline * nonzero

    assert query(summary, "SELECT count(*) FROM grid") == [(math.prod(axes),)]
    assert query(summary, "SELECT count(*) FROM images") == [(rendered,)]
    assert query(summary, "SELECT count(*) FROM runs WHERE status = 'completed'") == [(len(t["ranks"]),)]
    assert query(summary, "SELECT count(*) FROM checkpoints") == [(len(t["ranks"]) * len(t["checkpoint_steps"]),)]
    assert query(summary, "SELECT count(*) FROM losses") == [(len(t["ranks"]) * t["max_steps"],)]
    paths = [row[0] for row in query(summary, "SELECT DISTINCT path FROM grid")]
    assert len(paths) == rendered and all(Path(p).is_file() for p in paths)
    metrics_per_image = query(summary, "SELECT min(n), max(n) FROM (SELECT image_id, count(*) AS n "
                                       "FROM image_metrics GROUP BY image_id)")
    assert metrics_per_image[0][0] >= 8
    assert query(summary, "SELECT count(DISTINCT image_id) FROM image_metrics") == [(rendered,)]
    assert Path(summary["report"]).is_file()


def test_demo_concept_grows_with_lora_weight_and_step(demo_sweep) -> None:
    """Ground truth of the demo world: the base model cannot draw the zqx concept, the LoRA can.
    Mean concept score per (checkpoint step, LoRA weight) over ranks, samplers, steps, prompts, seeds."""
    summary, data, _ = demo_sweep
    rows = query(summary, "SELECT g.checkpoint_step, g.lora_weight, avg(m.value) FROM grid AS g "
                          "JOIN image_metrics AS m USING (image_id) WHERE m.metric = 'concept_score' "
                          "GROUP BY ALL ORDER BY ALL")
    score = {(step, weight): value for step, weight, value in rows}
    first, final = data["training"]["checkpoint_steps"][0], data["training"]["max_steps"]
    assert score[(final, 1.0)] >= score[(final, 0.0)] + 0.15, score
    assert score[(final, 0.0)] <= score[(final, 0.5)] <= score[(final, 1.0)], score
    assert score[(final, 1.0)] > score[(first, 1.0)], score
    best = query(summary, "SELECT checkpoint_step FROM best_by_metric WHERE metric = 'concept_score'")
    assert best == [(final,)]


@pytest.mark.parametrize("sql_file", COOKBOOK, ids=lambda p: p.stem)
def test_cookbook_query_runs_on_the_demo_output_and_is_in_the_readme(demo_sweep, sql_file: Path) -> None:
    summary, _, _ = demo_sweep
    sql = sql_file.read_text()
    rows = query(summary, sql)
    if sql_file.stem != "memorized_images":  # the demo LoRA is not expected to copy its training images
        assert rows, f"{sql_file.name} returned no rows on the demo output"
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--")).strip()
    assert body in (REPO / "README.md").read_text(), f"README lacks the query in {sql_file.name}"


def test_rerunning_the_demo_recomputes_nothing(demo_sweep) -> None:
    from flows.lora_sweep import lora_sweep

    summary, _, spec_path = demo_sweep
    root = Path(summary["sweep_root"])
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".png", ".safetensors", ".parquet")
             and "builtin" not in p.parts]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = lora_sweep(spec_path=str(spec_path))
    assert again["failures"] == []
    after = {p: p.stat().st_mtime_ns for p in files}
    assert after == before


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


def test_pngs_say_their_noise_is_drawn_on_the_cpu_and_results_are_readable_by_others(demo_sweep) -> None:
    """A1111 assumes `RNG: GPU` when a PNG does not say; every file the sweep writes has the mode the
    user's umask gives (0644 under the usual 022), not the 0600 of a temporary file."""
    summary, _, _ = demo_sweep
    root = Path(summary["sweep_root"])
    pngs = sorted((root / "images").rglob("*.png"))
    cells = [p for p in pngs if not p.name.startswith("grid-")]
    assert cells and all(parse_parameters(read_png_parameters(p)[0])["RNG"] == "CPU" for p in cells)
    mask = current_umask()
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".lock"]
    folders = [p for p in root.rglob("*") if p.is_dir()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o777 & ~mask)}


def test_flow_with_bad_inputs_fails_with_one_message_and_writes_nothing(prefect_harness, tmp_path: Path,
                                                                         caplog) -> None:
    from flows.lora_sweep import lora_sweep

    data = small_sweep_data(tmp_path / "out")
    data["dataset"]["path"] = str(tmp_path / "no-such-folder")
    state = lora_sweep(spec_path=str(write_spec(tmp_path, data)), return_state=True)
    assert state.is_failed() and "no-such-folder" in state.message and "is not a folder" in state.message
    assert "Traceback" not in caplog.text
    assert not (tmp_path / "out").exists()
