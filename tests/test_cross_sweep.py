"""Sweeps across time: every sweep under one output folder in one catalog and one index page, nothing made twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from storage.history import all_records
from tests.browser import BrowserUnavailable, Chromium, open_file
from tests.conftest import small_sweep_data, write_spec

pytestmark = pytest.mark.slow  # whole flows (three sweeps; a live one): 50-90 s each

REPO = Path(__file__).resolve().parent.parent


def tiny_sweep(output_dir: Path, name: str, learning_rates: list[float]) -> dict:
    data = small_sweep_data(output_dir, ranks=[2], max_steps=2, checkpoint_steps=[2], learning_rate=learning_rates,
                            batch_size=1)
    data["name"] = name
    data["render"].update(seeds=[1], samplers=["Euler a"], steps=[2])
    return data


@pytest.fixture(scope="module")
def three_sweeps(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """Sweep `lr` (two learning rates), sweep `other` (one of them), then `lr` again with a changed axis."""
    from flows.lora_sweep import lora_sweep

    out = tmp_path_factory.mktemp("cross") / "out"
    summaries = []
    for index, (name, rates) in enumerate([("lr", [1e-3, 2e-3]), ("other", [1e-3]), ("lr", [2e-3, 4e-3])]):
        folder = out.parent / f"spec{index}"
        folder.mkdir()
        summaries.append(lora_sweep(spec_path=str(write_spec(folder, tiny_sweep(out, name, rates)))))
    return out, summaries


def test_every_sweep_is_in_the_output_catalog_with_its_label(three_sweeps) -> None:
    out, summaries = three_sweeps
    with duckdb.connect(str(out / "catalog.duckdb"), read_only=True) as con:
        runs = con.execute("SELECT sweep_name, sweep_id, learning_rate FROM runs ORDER BY sweep_started_at, "
                           "learning_rate").fetchall()
        images = dict(con.execute("SELECT sweep_id, count(*) FROM images GROUP BY 1").fetchall())
        sweeps = con.execute("SELECT sweep_name, status, runs FROM sweeps ORDER BY started_at").fetchall()
    ids = [s["sweep_id"] for s in summaries]
    assert len(set(ids)) == 3
    assert runs == [("lr", ids[0], 1e-3), ("lr", ids[0], 2e-3), ("other", ids[1], 1e-3),
                    ("lr", ids[2], 2e-3), ("lr", ids[2], 4e-3)]
    # each sweep's grid: 1 prompt x 1 seed x 1 sampler x 1 step count, per run's checkpoint, + the baseline
    assert images == {ids[0]: 3, ids[1]: 2, ids[2]: 3}
    assert sweeps == [("lr", "completed", 2), ("other", "completed", 1), ("lr", "completed", 2)]


def test_nothing_is_trained_or_rendered_twice(three_sweeps) -> None:
    out, _ = three_sweeps
    losses = sorted(p.stem for p in out.glob("*/tables/losses/*.parquet"))
    assert len(losses) == len(set(losses)) == 3  # learning rates 1e-3, 2e-3, 4e-3: one training each
    images = sorted(p.stem for p in out.glob("*/tables/images/*.parquet"))
    assert len(images) == len(set(images)) == 4  # one baseline, three checkpoints
    other = out / "other"
    assert not list(other.glob("runs/*")), "the `other` sweep reused `lr`'s run instead of training"


def test_the_earlier_spec_under_a_name_keeps_its_results_and_report(three_sweeps) -> None:
    out, summaries = three_sweeps
    records = {r.sweep_id: r for r in all_records(out)}
    first = records[summaries[0]["sweep_id"]]
    assert (Path(first.root) / first.report).is_file()
    with duckdb.connect(str(out / "lr" / "catalog.duckdb"), read_only=True) as con:  # the name's latest spec
        assert sorted(r[0] for r in con.execute("SELECT learning_rate FROM runs").fetchall()) == [2e-3, 4e-3]


def test_the_index_page_lists_every_sweep_with_working_links(three_sweeps) -> None:
    out, summaries = three_sweeps
    try:
        with Chromium() as page:
            open_file(page, out / "index.html")
            rows = page.evaluate("[...document.querySelectorAll('tr.sweep')].map(r => r.dataset.sweepId)")
            links = page.evaluate("[...document.querySelectorAll('a.report-link')].map(a => a.href)")
    except BrowserUnavailable as err:
        pytest.skip(str(err))
    assert sorted(rows) == sorted(s["sweep_id"] for s in summaries)
    assert len(links) == 3
    assert all(Path(link.removeprefix("file://")).is_file() for link in links)


def test_the_duckdb_shell_in_the_venv_opens_the_catalogs(three_sweeps) -> None:
    out, summaries = three_sweeps
    shell = Path(sys.executable).parent / "duckdb"
    for catalog in (out / "catalog.duckdb", Path(summaries[2]["sweep_root"]) / "catalog.duckdb"):
        result = subprocess.run([str(shell), "-readonly", "-csv", str(catalog), "SELECT count(*) FROM runs"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["count_star()", "5" if catalog.parent == out else "2"]


@pytest.mark.parametrize("sql_file", sorted((REPO / "storage" / "cookbook_output").glob("*.sql")), ids=lambda p: p.stem)
def test_output_cookbook_queries_run_across_sweeps_and_are_in_the_readme(three_sweeps, sql_file: Path) -> None:
    out, _ = three_sweeps
    sql = sql_file.read_text()
    with duckdb.connect(str(out / "catalog.duckdb"), read_only=True) as con:
        rows = con.execute(sql).fetchall()
    # one best learning rate per sweep (each has one rank), every sweep started just now
    assert sorted(r[0] for r in rows) == ["lr", "lr", "other"]
    body = "\n".join(line for line in sql.splitlines() if not line.startswith("--")).strip()
    assert body in (REPO / "README.md").read_text(), f"README lacks the query in {sql_file.name}"
