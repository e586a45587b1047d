"""A render job's PNGs are written on a writer thread while the next batch denoises: the images and rows are
those of a job written in line, a batch that fails keeps every image written before it (a re-run renders only
the rest, to the same pixels), and a write that fails fails the job without a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from tasks.models.pipeline_pool import release_idle_pipelines
from tasks.preflight import prepare_inputs
from tasks.render import job as render_module
from tasks.render.job import render_job
from tasks.render.png_metadata import read_png_parameters
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import RenderJobSpec, render_jobs
from tests.conftest import small_sweep_data

SEEDS = [1, 2, 3, 4, 5]


def baseline_job(out: Path, model: Path) -> RenderJobSpec:
    """The no-LoRA job of a sweep rendering 5 seeds x 1 prompt x Euler a, 2 steps, on the tiny model."""
    data = small_sweep_data(out)
    data["base_models"] = [{"name": "tiny-sd15", "path": str(model)}]
    data["render"].update(samplers=["Euler a"], steps=[2], seeds=SEEDS)
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    [job] = render_jobs(spec, inputs.model_paths, [], [], inputs.dataset_path)
    return job


def pixels(table: Path) -> dict[str, np.ndarray]:
    return {row["image_id"]: np.asarray(Image.open(row["path"])) for row in pq.read_table(table).to_pylist()}


class Calls:
    """Counts the pipeline's calls; raises on call number `fail_at` (1-based) if set."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.count, self.fail_at, self.original = 0, fail_at, StableDiffusionPipeline.__call__

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> Calls:
        def call(pipe, *args, **kwargs):
            self.count += 1
            if self.count == self.fail_at:
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            return self.original(pipe, *args, **kwargs)

        monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
        return self


@pytest.fixture()
def in_line(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The job rendered without a fault, one image per call (CPU kernels round differently at other batch
    sizes, by one level in a few pixels): its images table."""
    release_idle_pipelines()
    with monkeypatch.context() as patch:
        patch.setattr(render_module, "MAX_BATCH", 1)
        return render_job(baseline_job(tmp_path / "in-line", tiny_model_dir))


def test_a_failed_batch_keeps_the_images_written_before_it(tmp_path: Path, tiny_model_dir: Path, in_line: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    job = baseline_job(tmp_path / "batched", tiny_model_dir)
    monkeypatch.setattr(render_module, "MAX_BATCH", 1)  # one image per pipeline call: 5 batches
    Calls(fail_at=4).patch(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        render_job(job)
    out_dir = Path(job.sweep_root) / "images" / job.render_id
    written = sorted(out_dir.glob("*.png"))
    assert len(written) == 3  # batches 1-3 finished, and their writes were waited for
    for path in written:
        _, ours = read_png_parameters(path)
        assert ours["render_id"] == job.render_id and ours["render_s"] > 0
    assert not list((Path(job.sweep_root) / "tables").rglob("*.parquet"))  # no table: the job is not finished

    monkeypatch.undo()
    monkeypatch.setattr(render_module, "MAX_BATCH", 1)
    calls = Calls().patch(monkeypatch)
    table = render_job(job)
    assert calls.count == 2  # only the two missing images
    again, reference = pixels(table), pixels(in_line)
    assert again.keys() == reference.keys()
    for image_id, image in again.items():
        assert np.array_equal(image, reference[image_id]), image_id
    rows = pq.read_table(table).to_pylist()
    assert all(row["render_s"] > 0 for row in rows)
    first = {row["image_id"]: row["render_s"] for row in rows}
    for path in written:  # an image found on disk keeps the render time its PNG recorded
        assert first[path.stem] == read_png_parameters(path)[1]["render_s"]


def test_a_failed_png_write_fails_the_job_without_a_table(tmp_path: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    job = baseline_job(tmp_path / "full-disk", tiny_model_dir)
    monkeypatch.setattr(render_module, "MAX_BATCH", 2)
    original = Image.Image.save
    saves = []

    def save(image, fp, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:
            raise OSError(28, "No space left on device (injected)")
        return original(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    with pytest.raises(OSError, match="No space left"):
        render_job(job)
    assert not list((Path(job.sweep_root) / "tables").rglob("*.parquet"))
    monkeypatch.setattr(Image.Image, "save", original)
    rows = pq.read_table(render_job(job)).to_pylist()
    assert len(rows) == len(SEEDS) and all(Path(row["path"]).exists() for row in rows)
