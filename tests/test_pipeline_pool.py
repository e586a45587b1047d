"""Render jobs reuse one pipeline per process (tasks.models.pipeline_pool) and render exactly the pixels
each job renders on a freshly loaded pipeline: across checkpoints whose LoRA layers are swapped in
place, other ranks and targets (loaded afresh), LoHa weight patches, a text-encoder LoRA, extra LoRAs
and the no-LoRA baseline, in any order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.models import pipeline_pool
from tasks.models.pipeline_pool import adapter_copies, borrowed_pipeline, pipelines_loaded, release_idle_pipelines
from tasks.preflight import prepare_inputs
from tasks.render import job as render_module
from tasks.render.job import render_job
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import RenderJobSpec, render_jobs, training_runs
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data
from tests.test_extra_loras import random_lora, save_diffusers

pytestmark = pytest.mark.slow  # six tiny trainings and 24 render jobs: about a minute, past the fast suite's budget

RUNS = {  # name -> training options: each a different kind of change between consecutive jobs
    "a": {},
    "rank4": {"ranks": [4]},
    "locon": {"target_preset": "locon"},
    "loha": {"network": "loha"},
    "te": {"train_text_encoder": True, "text_encoder_lr": 1e-2},
}
ORDER = ["baseline", "a@1", "a@2", "rank4@2", "a@1", "locon@2", "loha@2", "a@2", "te@2", "a@1", "extra:a@2",
         "baseline"]


def sweep(out: Path, model: Path, extra: Path | None = None, **training: object) -> dict:
    data = small_sweep_data(out, **{"ranks": [2], "max_steps": 2, "checkpoint_steps": [1, 2],
                                    "learning_rate": 5e-2, **training})
    data["base_models"] = [{"name": "tiny-sd15", "path": str(model)}]  # one base model file for every sweep
    data["render"].update(samplers=["Euler a"], steps=[2], seeds=[1], lora_weights=[0.5, 1.0])
    if extra is not None:
        data["render"]["extra_loras"] = [{"name": "style", "path": str(extra), "weight": 0.7}]
    return data


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, RenderJobSpec]:
    """Each run trained 2 steps (checkpoints 1 and 2); its render jobs by "<run>@<step>", the baseline and
    run a's step-2 job with an extra LoRA ("extra:a@2")."""
    root = tmp_path_factory.mktemp("pool")
    extra = save_diffusers(root / "loras", "style.safetensors", random_lora(tiny_model_dir, seed=5))
    found: dict[str, RenderJobSpec] = {}
    for name, options in RUNS.items():
        for with_extra in (False, True) if name == "a" else (False,):
            spec = parse_spec(sweep(root / name, tiny_model_dir, extra if with_extra else None, **options))
            inputs = prepare_inputs(spec)
            [run] = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
            checkpoints = train_lora(run).checkpoints
            for job in render_jobs(spec, inputs.model_paths, checkpoints, [run], inputs.dataset_path):
                key = "baseline" if job.checkpoint is None else f"{name}@{job.checkpoint.step}"
                found.setdefault(f"extra:{key}" if with_extra else key, job)
    return found


def pixels(job: RenderJobSpec, root: Path) -> dict[tuple, np.ndarray]:
    """The job rendered into an empty sweep folder under `root`: image (weight, seed) -> pixels."""
    rows = pq.read_table(render_job(job.model_copy(update={"sweep_root": str(root)}))).to_pylist()
    return {(r["lora_weight"], r["seed"]): np.asarray(Image.open(r["path"]).convert("RGB")) for r in rows}


def test_a_pooled_sequence_renders_the_pixels_of_fresh_pipelines(jobs, tmp_path: Path, monkeypatch) -> None:
    swapped: list[str] = []
    copy = pipeline_pool.copy_adapter_weights

    def spy(unet, file, adapter):
        swapped.append(str(Path(file).parent))
        return copy(unet, file, adapter)

    monkeypatch.setattr(render_module, "copy_adapter_weights", spy)
    release_idle_pipelines()
    loaded, copies = pipelines_loaded(), adapter_copies()
    pooled = [pixels(jobs[key], tmp_path / f"pooled-{i}") for i, key in enumerate(ORDER)]
    assert pipelines_loaded() - loaded == 1  # every job after the first borrowed the same pipeline
    # Layers reused only after the same configuration (a@1 -> a@2, a@1 -> extra:a@2), never across ranks,
    # targets, types or a text-encoder LoRA; both swaps copied in place.
    assert swapped == [jobs["a@2"].checkpoint.lora_dir, jobs["extra:a@2"].checkpoint.lora_dir]
    assert adapter_copies() - copies == 2
    swapped.clear()
    for i, key in enumerate(ORDER):
        release_idle_pipelines()
        fresh = pixels(jobs[key], tmp_path / f"fresh-{i}")
        assert fresh.keys() == pooled[i].keys()
        for cell, image in fresh.items():
            assert np.array_equal(image, pooled[i][cell]), f"{key} (job {i}) {cell}"
    changed = [not np.array_equal(pooled[ORDER.index("a@1")][(1.0, 1)], pooled[ORDER.index(k)][(1.0, 1)])
               for k in ("a@2", "rank4@2", "locon@2", "loha@2", "te@2", "extra:a@2")]
    assert all(changed)  # each job renders its own LoRA: a stale adapter would show here


def test_a_failed_job_does_not_return_its_pipeline(tiny_model_dir: Path) -> None:
    release_idle_pipelines()
    with pytest.raises(RuntimeError), borrowed_pipeline(str(tiny_model_dir), config=None, device="cpu",
                                                        torch_dtype=pipeline_pool.torch.float32):
        raise RuntimeError("job failed half way")
    assert release_idle_pipelines() == 0


def test_training_releases_idle_render_pipelines(jobs, tmp_path: Path, tiny_model_dir: Path) -> None:
    pixels(jobs["baseline"], tmp_path / "render")
    spec = parse_spec(sweep(tmp_path / "train", tiny_model_dir, max_steps=1, checkpoint_steps=[1]))
    inputs = prepare_inputs(spec)
    [run] = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
    train_lora(run)
    assert release_idle_pipelines() == 0  # training dropped the idle render pipeline before loading its own
