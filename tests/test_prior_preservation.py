"""Prior preservation (issue 22): class images rendered once by the base model and cached by content, a
class loss beside the instance loss, recorded in the losses, runs and kohya metadata, and the demo world's
check that the concept is still learnt while the class moves less (slow)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors import safe_open

from storage.layout import SweepLayout
from tasks.data.dataset import scan_dataset
from tasks.disk_space import class_image_bytes, estimate_sweep_bytes, image_bytes
from tasks.models.base_model import load_pipeline
from tasks.preflight import prepare_inputs
from tasks.render.samplers import make_scheduler
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import TrainingRunSpec, training_runs
from tasks.train.class_images import (
    RENDERERS_FILE,
    class_images_dir,
    class_images_root,
    class_latents,
    ensure_class_images,
)
from tasks.train.loop import fit_lora
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data
from tests.fault_injection import assert_resumes_bit_identically

PRIOR = {"class_prompt": "a triangle", "num_class_images": 3, "steps": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("prior")
    inputs = prepare_inputs(parse_spec(small_sweep_data(out)))
    return out, inputs, scan_dataset(Path(inputs.dataset_path))


def spec_data(out: Path, prior: dict | None = None, **training: object) -> dict:
    options = {"ranks": [2], "max_steps": 4, "checkpoint_steps": [4], "learning_rate": 1e-2, **training}
    if prior is not None:
        options["prior_preservation"] = prior
    return small_sweep_data(out, **options)


def make_run(world, prior: dict | None = None, out: Path | None = None, **training: object) -> TrainingRunSpec:
    base, inputs, _ = world
    spec = parse_spec(spec_data(out or base, prior, **training))
    return training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


def fresh_pipe(world):
    pipe = load_pipeline(world[1].model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def refused(data: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


@pytest.mark.parametrize(("prior", "expected"), [
    ({"class_prompt": "  "}, "training.prior_preservation.class_prompt: got '  '; the class prompt is blank; allowed:"),
    ({"class_prompt": ""}, "training.prior_preservation.class_prompt: got ''; String should have at least 1 character"),
    ({"class_prompt": "a triangle", "num_class_images": 0},
     "training.prior_preservation.num_class_images: got 0; Input should be greater than or equal to 1"),
    ({"class_prompt": "a triangle", "prior_loss_weight": 0},
     "training.prior_preservation.prior_loss_weight: got 0; Input should be greater than 0"),
    ({"class_prompt": "a triangle", "prior_loss_weight": -1.0},
     "training.prior_preservation.prior_loss_weight: got -1.0; Input should be greater than 0"),
    ({"class_prompt": "a ZQX triangle"},
     "training.prior_preservation.class_prompt 'a ZQX triangle' contains the trigger word 'zqx'; allowed: the class"),
    ({"class_prompt": "a {trigger} triangle"},
     "training.prior_preservation.class_prompt 'a {trigger} triangle' holds {trigger}; allowed: the class alone"),
    ({"class_prompt": "a triangle", "sampler": "Eulr a"}, "unknown sampler 'Eulr a'. Did you mean 'Euler a'?"),
    ({"num_class_images": 4}, "training.prior_preservation.class_prompt: required key is missing"),
    ({"class_prompt": "a triangle", "class_images": 4}, "training.prior_preservation.class_images: unknown key"),
    ({"class_prompt": "a triangle", "train_on": "pixels"},
     "training.prior_preservation.train_on: got 'pixels'; Input should be 'latents' or 'images'"),
])
def test_bad_prior_preservation_is_refused_before_work(tmp_path: Path, prior: dict, expected: str) -> None:
    assert expected in refused(spec_data(tmp_path, prior))
    assert not tmp_path.joinpath("small").exists()


def test_a_class_word_that_only_contains_the_trigger_is_allowed(tmp_path: Path) -> None:
    spec = parse_spec(spec_data(tmp_path, {"class_prompt": "a zqxyz triangle"}))  # not the word zqx
    assert spec.training.prior_preservation.class_prompt == "a zqxyz triangle"


def test_prior_preservation_enters_run_ids_only_when_used(world) -> None:
    plain = make_run(world)
    assert make_run(world, None).run_id == plain.run_id and plain.prior_preservation is None
    with_prior = make_run(world, PRIOR)
    assert with_prior.run_id != plain.run_id
    others = [make_run(world, {**PRIOR, "prior_loss_weight": 0.5}), make_run(world, {**PRIOR, "num_class_images": 4}),
              make_run(world, {**PRIOR, "class_prompt": "a square"}), make_run(world, {**PRIOR, "cfg_scale": 7.0}),
              make_run(world, {**PRIOR, "train_on": "images"})]
    assert len({with_prior.run_id, *(r.run_id for r in others)}) == 6


def test_class_images_are_rendered_once_cached_by_content_and_reused(world, tmp_path: Path) -> None:
    run = make_run(world, PRIOR, out=tmp_path)
    folder = class_images_dir(run)
    assert folder.parent == class_images_root(run) == Path(run.cache_dir) / "class-images"
    items = ensure_class_images(run, fresh_pipe(world), "cpu")
    assert [i.path.name for i in items] == ["0.png", "1.png", "2.png"] and {i.caption for i in items} == {"a triangle"}
    first = {i.path.name: i.path.read_bytes() for i in items}
    assert len(set(first.values())) == 3  # three seeds, three images
    latents = class_latents(items)  # the sampler's latents beside the PNGs, as the UNet sees them
    assert [tuple(latent.shape) for latent in latents] == [(4, 8, 8)] * 3
    pipe = fresh_pipe(world)  # each PNG is the pipeline's own image of its seed (decoded from that latent)
    pipe.scheduler = make_scheduler("Euler a", dict(pipe.scheduler.config), seed=[1])
    plain = pipe(prompt="a triangle", num_inference_steps=2, guidance_scale=1.0, width=64, height=64,
                 generator=torch.Generator().manual_seed(1)).images[0]
    with Image.open(items[1].path) as png:
        difference = np.abs(np.asarray(png.convert("RGB")).astype(int) - np.asarray(plain))
    assert difference.max() <= 1 and difference.mean() < 0.01  # float rounding at a quantisation step, at most
    again = ensure_class_images(make_run(world, {**PRIOR, "prior_loss_weight": 2.0}, out=tmp_path), fresh_pipe(world),
                                "cpu")
    assert again == items  # another run with the same base model, prompt and seeds: nothing rendered
    more = ensure_class_images(make_run(world, {**PRIOR, "num_class_images": 5}, out=tmp_path), fresh_pipe(world), "cpu")
    assert more[:3] == items and len(more) == 5
    assert [line["images"] for line in map(json.loads, (folder / RENDERERS_FILE).read_text().splitlines())] == [3, 2]
    (folder / "1.png").unlink()  # a lost image (or latent) is rendered again, pixel for pixel
    (folder / "2.safetensors").unlink()
    ensure_class_images(run, fresh_pipe(world), "cpu")
    assert {i.path.name: i.path.read_bytes() for i in items} == first
    assert all(torch.equal(a, b) for a, b in zip(class_latents(items), latents, strict=True))
    assert class_images_dir(make_run(world, {**PRIOR, "class_prompt": "a square"}, out=tmp_path)) != folder
    assert class_images_dir(make_run(world, {**PRIOR, "steps": 3}, out=tmp_path)) != folder
    assert class_images_dir(make_run(world, {**PRIOR, "cfg_scale": 7.0}, out=tmp_path)) != folder
    assert class_images_dir(make_run(world, {**PRIOR, "train_on": "images"}, out=tmp_path)) == folder  # both kept


def test_two_runs_at_once_render_the_class_images_once(world, tmp_path: Path) -> None:
    runs = [make_run(world, PRIOR, out=tmp_path), make_run(world, {**PRIOR, "prior_loss_weight": 3.0}, out=tmp_path)]
    pipes = [fresh_pipe(world) for _ in runs]
    results: list[list] = [[], []]

    def work(i: int) -> None:
        results[i] = ensure_class_images(runs[i], pipes[i], "cpu")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] and len(results[0]) == 3
    assert len((class_images_dir(runs[0]) / RENDERERS_FILE).read_text().splitlines()) == 1


def test_the_class_loss_trains_beside_an_unchanged_instance_draw(world) -> None:
    _, _, items = world
    plain_run, prior_run = make_run(world), make_run(world, PRIOR)
    class_items = ensure_class_images(prior_run, fresh_pipe(world), "cpu")
    histories, loras = [], []
    for run, extra in ((plain_run, None), (prior_run, class_items),
                       (make_run(world, {**PRIOR, "prior_loss_weight": 4.0}), class_items),
                       (make_run(world, {**PRIOR, "train_on": "images"}), class_items)):
        pipe = fresh_pipe(world)
        histories.append(fit_lora(pipe, run, items, device="cpu", class_items=extra))
        loras.append(get_peft_model_state_dict(pipe.unet, adapter_name="default"))
    plain, prior, heavy, reencoded = histories
    assert plain.prior_losses == [None] * 4 and all(v is not None and v > 0 for v in prior.prior_losses)
    # Step 1 draws the same instance examples, noise and timesteps with or without the class batch.
    assert prior.losses[0] == plain.losses[0] == heavy.losses[0] and prior.prior_losses[0] == heavy.prior_losses[0]
    # The same draw on the sampler's latents and on the VAE's re-encoding of the PNGs: different class losses.
    assert reencoded.losses[0] == plain.losses[0] and reencoded.prior_losses[0] != prior.prior_losses[0]
    assert prior.grad_norms[0] != plain.grad_norms[0] != heavy.grad_norms[0]  # the class loss and its weight count
    assert any(not torch.equal(loras[0][k], loras[1][k]) for k in loras[0])
    assert any(not torch.equal(loras[1][k], loras[2][k]) for k in loras[1])


def test_a_prior_preservation_run_records_its_class_loss_and_resumes_bit_identically(world, tmp_path: Path) -> None:
    run = make_run(world, PRIOR, out=tmp_path, checkpoint_steps=None, checkpoint_every=2)
    layout = SweepLayout(Path(run.sweep_root))
    train_lora(run)
    losses = pq.read_table(layout.table_file("losses", run.run_id)).to_pylist()
    assert [row["step"] for row in losses] == [1, 2, 3, 4]
    assert all(row["prior_loss"] is not None and row["prior_loss"] > 0 for row in losses)
    row = pq.read_table(layout.table_file("runs", run.run_id)).to_pylist()[0]
    assert (row["class_prompt"], row["num_class_images"], row["prior_loss_weight"]) == ("a triangle", 3, 1.0)
    folder = layout.checkpoint_dir(run.run_id, 4)
    with safe_open(str(folder / f"{run.run_id}-s4.safetensors"), "pt") as f:
        meta = f.metadata()
    reg_dir = class_images_dir(run).name
    assert (meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("3", "1.0")
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {reg_dir: {"n_repeats": 1, "img_count": 3}}
    assert_resumes_bit_identically(train_lora, run, layout, 4, losses)  # killed after its step-2 checkpoint


@pytest.mark.slow
def test_the_unet_loads_in_fp32_only_while_class_images_are_missing(world, tmp_path: Path, monkeypatch) -> None:
    """bf16 training: the first run renders the class images with the fp32 base model; a run finding them
    cached loads its UNet straight in bf16 (what a 10 or 12 GiB card needs for SDXL), with the same LoRA."""
    loaded: list[torch.dtype] = []

    def recording_load(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        loaded.append(pipe.unet.dtype)
        return pipe

    monkeypatch.setattr("tasks.train.run.load_pipeline", recording_load)
    states = []
    for out in (tmp_path / "first", tmp_path / "second"):  # one class-image cache: cache_dir shared below
        run = make_run(world, PRIOR, out=out, mixed_precision="bf16", max_steps=2, checkpoint_steps=[2],
                       cache_dir=str(tmp_path / "cache"))
        [ckpt] = train_lora(run).checkpoints
        states.append(torch.load(Path(ckpt.lora_dir) / "training_state.pt", weights_only=False)["lora"])
    assert loaded == [torch.float32, torch.bfloat16]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_run_without_prior_preservation_writes_what_sd_scripts_writes(world, tmp_path: Path) -> None:
    run = make_run(world, out=tmp_path, max_steps=1, checkpoint_steps=[1])
    train_lora(run)
    layout = SweepLayout(Path(run.sweep_root))
    with safe_open(str(layout.checkpoint_dir(run.run_id, 1) / f"{run.run_id}-s1.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_reg_images"], meta["ss_reg_dataset_dirs"], meta["ss_prior_loss_weight"]) == ("0", "{}", "1.0")
    assert pq.read_table(layout.table_file("losses", run.run_id)).column("prior_loss").to_pylist() == [None]
    row = pq.read_table(layout.table_file("runs", run.run_id)).to_pylist()[0]
    assert (row["class_prompt"], row["num_class_images"], row["prior_loss_weight"]) == (None, None, None)
    assert not class_images_root(run).exists()


def test_the_disk_estimate_counts_class_images_not_yet_rendered(world, tmp_path: Path) -> None:
    _, inputs, _ = world
    sizes = {}
    for name, prior in (("plain", None), ("prior", {**PRIOR, "num_class_images": 40})):
        spec = parse_spec(spec_data(tmp_path / name, prior))
        sizes[name] = estimate_sweep_bytes(spec, inputs).images
    assert sizes["prior"] - sizes["plain"] == 40 * class_image_bytes(64)
    assert class_image_bytes(64) > image_bytes(64, 64)  # the sampler's latent beside each PNG counts too
    spec = parse_spec(spec_data(tmp_path / "prior", PRIOR))
    before = estimate_sweep_bytes(spec, inputs).images
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    ensure_class_images(run, fresh_pipe(world), "cpu")
    assert before - estimate_sweep_bytes(spec, inputs).images == 3 * class_image_bytes(64)
    written = [f for f in class_images_dir(run).iterdir() if f.suffix in (".png", ".safetensors")]
    assert len(written) == 6 and sum(f.stat().st_size for f in written) <= 3 * class_image_bytes(64)


@pytest.mark.slow
def test_sdxl_trains_with_prior_preservation(tmp_path: Path) -> None:
    data = spec_data(tmp_path, PRIOR, max_steps=2, checkpoint_steps=[2])
    data["base_models"] = [{"name": "tiny-sdxl", "path": "builtin:tiny-sdxl"}]
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    train_lora(run)
    losses = pq.read_table(SweepLayout(Path(run.sweep_root)).table_file("losses", run.run_id)).to_pylist()
    assert len(losses) == 2 and all(row["prior_loss"] > 0 for row in losses)
    assert len(list(class_images_dir(run).glob("*.png"))) == 3


# The demo-world check (bench/prior_preservation.py; measured figures in the README). The concept score at
# weight 1 may drop by at most CONCEPT_MARGIN. Under the render stage's demo settings (Euler a, CFG 7, negative
# "blurry") the class prompt's images must keep the base model's colours better than without prior preservation
# (pooled histogram chi2) and leak less of the concept, and their per-seed pixel distance may exceed the run
# without by at most PIXEL_MARGIN (0-255): there it measured 11.30 against 10.63 (+0.67, s.e. 1.05 over the
# 16 seeds). Under the deterministic twin (Euler, same CFG and negative), where a change of the prediction moves
# each seed's image along one trajectory, the images must move at least DETERMINISTIC_GAIN less per seed than
# without: measured 10.26 against 14.57 (-4.31, s.e. 0.93, 14 of 16 seeds), so 2.0 is half the measured gap
# and more than two standard errors inside it. At CFG 1 (the conditional prediction the prior loss trains) they
# must move less: 3.44 against 6.75. The earlier class images (CFG 7, PNGs re-encoded) fail all three pixel
# checks: 19.30 against 10.63 under Euler a, 24.26 against 14.57 under Euler, 8.76 against 6.75 at CFG 1.
CONCEPT_MARGIN = 0.10
PIXEL_MARGIN = 1.5
DETERMINISTIC_GAIN = 2.0


@pytest.mark.slow
def test_demo_world_keeps_the_concept_and_the_class_prompt_moves_less(tmp_path: Path) -> None:
    from bench.prior_preservation import Settings, compare

    result = compare(tmp_path, Settings())
    print("\n".join(result.lines(Settings())))
    without, with_prior, base = result.without, result.with_prior, result.base_class_concept
    assert with_prior.concept >= without.concept - CONCEPT_MARGIN
    assert with_prior.class_colours < without.class_colours
    assert abs(with_prior.class_concept - base) < abs(without.class_concept - base)
    assert with_prior.class_pixels <= without.class_pixels + PIXEL_MARGIN
    euler, unguided = result.setting("b"), result.setting("d")
    assert (euler.setting.sampler, euler.setting.cfg, unguided.setting.cfg) == ("Euler", 7.0, 1.0)
    assert euler.with_prior.pixels <= euler.without.pixels - DETERMINISTIC_GAIN
    assert euler.with_prior.ssim_distance < euler.without.ssim_distance
    assert unguided.with_prior.pixels < unguided.without.pixels
