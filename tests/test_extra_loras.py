"""Extra LoRAs stacked at their own weights: they change the image, weight 0 of ours with them equals
the baseline with them, PNG metadata and image rows name every LoRA, ids follow the extras' files
and weights, and bad extra-LoRA inputs are refused before any work."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from tasks.lora.export import kohya_state_dict, text_encoder_lora_state
from tasks.lora.files import DIFFUSERS_FILE
from tasks.models.base_model import load_pipeline
from tasks.preflight import InputError, prepare_inputs
from tasks.render.job import render_job
from tasks.render.png_metadata import parse_image_parameters, read_png_parameters
from tasks.sweep.cells import grid_cells, image_id
from tasks.sweep.ids import checkpoint_id
from tasks.sweep.load import SpecError, load_spec, parse_spec
from tasks.sweep.plan import CheckpointRef, render_jobs, training_runs
from tasks.sweep.presets import TEXT_ENCODER_TARGETS
from tests.conftest import small_sweep_data, write_spec

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
EXTRAS = [{"name": "style", "path": "loras/style.safetensors", "weight": 0.7},
          {"name": "grain", "path": "loras/grain.safetensors", "weight": 0.5}]


def random_lora(model_dir: Path, seed: int, *, text_encoder: bool = False) -> tuple[dict, dict, dict]:
    """(UNet peft state, text-encoder peft state, UNet LoRA config) of a random, clearly visible LoRA."""
    pipe = load_pipeline(str(model_dir))
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=1.0, target_modules=ATTENTION, init_lora_weights="gaussian")
    pipe.unet.add_adapter(config)
    with torch.no_grad():  # gaussian init leaves B at zero: give it weights so the LoRA does something
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    unet_state = get_peft_model_state_dict(pipe.unet)
    te_state: dict = {}
    if text_encoder:
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1.0, target_modules=list(TEXT_ENCODER_TARGETS),
                                           init_lora_weights=False), pipe.text_encoder, adapter_name="default")
        te_state = text_encoder_lora_state(pipe.text_encoder, "default")
    return unet_state, te_state, config.to_dict()


def save_diffusers(folder: Path, weight_name: str, state: tuple[dict, dict, dict]) -> Path:
    unet_state, te_state, config = state
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_state, weight_name=weight_name,
                                              unet_lora_adapter_metadata=config, safe_serialization=True,
                                              text_encoder_lora_layers=te_state or None)
    return folder / weight_name


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    """A spec folder with two extra LoRAs (diffusers format; kohya format with a text-encoder part) and
    "our" checkpoint (random weights saved as the training task saves them)."""
    root = tmp_path_factory.mktemp("extras")
    (root / "loras").mkdir()
    save_diffusers(root / "loras", "style.safetensors", random_lora(tiny_model_dir, seed=1))
    unet_state, te_state, _ = random_lora(tiny_model_dir, seed=2, text_encoder=True)
    save_file(kohya_state_dict(unet_state, 1.0, te_state), str(root / "loras" / "grain.safetensors"))
    data = small_sweep_data(root / "out", ranks=[2], checkpoint_steps=[6])
    data["base_models"] = [{"name": "tiny-sd15", "path": str(tiny_model_dir)}]
    data["render"].update(samplers=["Euler"], steps=[2], seeds=[1], lora_weights=[0.0, 1.0])
    plain = parse_spec(data)
    data["render"]["extra_loras"] = EXTRAS
    spec = load_spec(write_spec(root, data))
    inputs = prepare_inputs(spec)
    run = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]
    ckpt_id = checkpoint_id(run.run_id, 6)
    lora_dir = root / "ckpt"
    ours = random_lora(tiny_model_dir, seed=3)
    save_diffusers(lora_dir, DIFFUSERS_FILE, ours)
    save_file(kohya_state_dict(ours[0], 1.0), str(lora_dir / f"{ckpt_id}.safetensors"))
    ckpt = CheckpointRef(run_id=run.run_id, checkpoint_id=ckpt_id, step=6, rank=2, lora_dir=str(lora_dir))
    return root, spec, plain, inputs, run, ckpt


def jobs_for(spec, inputs, run, ckpt) -> list:
    return render_jobs(spec, inputs.model_paths, [ckpt], [run], inputs.dataset_path)


def rendered(job) -> tuple[list[dict], dict[str, np.ndarray]]:
    rows = pq.read_table(render_job(job)).to_pylist()
    return rows, {r["image_id"]: np.asarray(Image.open(r["path"]).convert("RGB")) for r in rows}


@pytest.fixture(scope="module")
def renders(world):
    """The baseline and checkpoint jobs with extras, the checkpoint job at weight 0, the baseline without extras."""
    _, spec, plain, inputs, run, ckpt = world
    baseline, job = jobs_for(spec, inputs, run, ckpt)
    # Weight 0 is normally the baseline's column; a job of its own here, so it has no baseline beside it.
    zero = job.model_copy(update={"lora_weights": (0.0,), "render_id": f"{job.render_id}-w0",
                                  "baseline_render_id": None})
    no_extras = jobs_for(plain, inputs, run, ckpt)[0].model_copy(update={"render_id": "baseline-no-extras"})
    return {name: (j, *rendered(j)) for name, j in
            (("baseline", baseline), ("job", job), ("zero", zero), ("no_extras", no_extras))}


def only_image(render) -> np.ndarray:
    _, _, images = render
    (image,) = images.values()
    return image.astype(int)


def test_spec_paths_resolve_against_the_spec_folder(world) -> None:
    root, spec, *_ = world
    assert [Path(x.path) for x in spec.render.extra_loras] == [root / "loras" / "style.safetensors",
                                                               root / "loras" / "grain.safetensors"]


def test_extra_loras_change_the_baseline_image(renders) -> None:
    assert np.abs(only_image(renders["baseline"]) - only_image(renders["no_extras"])).max() > 10


def test_weight_zero_of_ours_with_extras_equals_the_baseline_with_extras(renders) -> None:
    assert np.array_equal(only_image(renders["zero"]), only_image(renders["baseline"]))
    assert np.abs(only_image(renders["job"]) - only_image(renders["baseline"])).max() > 10  # ours does act


def a1111_lora_hash(file: Path) -> str:
    """What A1111 shows in "Lora hashes" for a .safetensors LoRA: sha256 after the header, 12 hex digits
    (kohya's sshs_model_hash, where the file has one, is that same hash)."""
    data = file.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_png_metadata_names_every_lora_and_round_trips(renders, world) -> None:
    root, *_, ckpt = world
    hashes = {n: a1111_lora_hash(root / "loras" / f"{n}.safetensors") for n in ("style", "grain")}
    ours = a1111_lora_hash(Path(ckpt.lora_dir) / f"{ckpt.checkpoint_id}.safetensors")
    job, rows, _ = renders["job"]
    text, _ = read_png_parameters(rows[0]["path"])
    assert f"<lora:{ckpt.checkpoint_id}:1> <lora:style:0.7> <lora:grain:0.5>\n" in text
    assert f'Lora hashes: "{ckpt.checkpoint_id}: {ours}, style: {hashes["style"]}, grain: {hashes["grain"]}"' in text
    params = parse_image_parameters(text)
    assert params.prompt == "a photo of zqx"
    assert params.loras == ((ckpt.checkpoint_id, 1.0, ours), ("style", 0.7, hashes["style"]),
                            ("grain", 0.5, hashes["grain"]))
    _, baseline_rows, _ = renders["baseline"]
    baseline = parse_image_parameters(read_png_parameters(baseline_rows[0]["path"])[0])
    assert baseline.loras == (("style", 0.7, hashes["style"]), ("grain", 0.5, hashes["grain"]))


def test_image_rows_record_the_extras(renders, world) -> None:
    root, *_ = world
    _, rows, _ = renders["job"]
    recorded = json.loads(rows[0]["extra_loras"])
    assert [(x["name"], x["weight"], x["path"]) for x in recorded] == [
        ("style", 0.7, str(root / "loras" / "style.safetensors")),
        ("grain", 0.5, str(root / "loras" / "grain.safetensors"))]
    assert all(len(x["sha256"]) == 64 for x in recorded)
    _, plain_rows, _ = renders["no_extras"]
    assert plain_rows[0]["extra_loras"] is None


def test_ids_change_when_an_extras_weight_or_file_changes(world, tmp_path: Path) -> None:
    root, spec, plain, inputs, run, ckpt = world

    def ids(s) -> list[tuple[str, str]]:
        return [(j.render_id, image_id(j, grid_cells(j)[0])) for j in jobs_for(s, inputs, run, ckpt)]

    def with_extras(extras: list[dict]):
        return parse_spec({**spec.model_dump(mode="json", exclude={"execution"}),
                           "render": {**spec.render.model_dump(mode="json"), "extra_loras": extras}})

    before = ids(spec)
    assert ids(with_extras([{**x.model_dump()} for x in spec.render.extra_loras])) == before  # same spec, same ids
    heavier = [{**x.model_dump(), "weight": 0.8 if x.name == "style" else x.weight} for x in spec.render.extra_loras]
    heavier_ids = ids(with_extras(heavier))
    assert all(a[0] != b[0] and a[1] != b[1] for a, b in zip(before, heavier_ids))
    other_file = tmp_path / "style.safetensors"  # the same name and weight, other weights in the file
    shutil.copy(root / "loras" / "grain.safetensors", other_file)
    moved = [{**x.model_dump(), "path": str(other_file) if x.name == "style" else x.path}
             for x in spec.render.extra_loras]
    assert all(a[1] != b[1] for a, b in zip(before, ids(with_extras(moved))))
    assert all(a[1] != b[1] for a, b in zip(before, ids(plain)))


# Bad inputs: docs/bad-inputs.md links each case here.

@pytest.fixture(scope="module")
def bad_root(world, tiny_model_dir: Path) -> Path:
    root, *_ = world
    (root / "bad").mkdir()
    (root / "model").symlink_to(tiny_model_dir)
    (root / "bad" / "style.ckpt").write_bytes(b"pickle")
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, str(root / "bad" / "base.safetensors"))
    (root / "bad" / "broken.safetensors").write_bytes(b"not a safetensors file")
    return root


def input_problems(root: Path, extras: list[dict]) -> InputError:
    data = small_sweep_data(root / "bad-out")
    data["base_models"] = [{"name": "tiny-sd15", "path": str(root / "model")}]
    data["render"]["extra_loras"] = extras
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    return info.value


def test_every_bad_extra_lora_file_is_reported_at_once_before_any_work(bad_root: Path) -> None:
    err = input_problems(bad_root, [
        {"name": "missing", "path": str(bad_root / "bad" / "nope.safetensors")},
        {"name": "pickle", "path": str(bad_root / "bad" / "style.ckpt")},
        {"name": "base", "path": str(bad_root / "bad" / "base.safetensors")},
        {"name": "broken", "path": str(bad_root / "bad" / "broken.safetensors")},
        {"name": "folder", "path": str(bad_root / "bad")},
    ])
    assert len(err.problems) == 5, err
    missing, pickle, base, broken, folder = err.problems
    assert missing.startswith("render.extra_loras[0] (missing): LoRA file ")
    assert "nope.safetensors: does not exist" in missing
    assert "render.extra_loras[1] (pickle)" in pickle and ".ckpt is a pickle, which can run code" in pickle
    assert "render.extra_loras[2] (base)" in base and "not a LoRA" in base and "model.diffusion_model.conv_in" in base
    assert "render.extra_loras[3] (broken)" in broken and "not a readable safetensors file" in broken
    assert "render.extra_loras[4] (folder)" in folder and "is a folder" in folder
    assert all("expected" in p for p in err.problems)
    assert not (bad_root / "bad-out" / "small").exists()  # no sweep folder: nothing trained or rendered


def test_good_extra_loras_of_both_formats_pass(world) -> None:
    _, spec, *_ = world
    assert prepare_inputs(spec).model_paths  # the world fixture's kohya and diffusers files


def test_bad_extra_lora_spec_values(tmp_path: Path) -> None:
    data = small_sweep_data(tmp_path)
    data["render"]["extra_loras"] = [{"name": "style", "path": "a.safetensors"},
                                     {"name": "style", "path": "b.safetensors", "weight": 9},
                                     {"name": "a:b", "path": "c.safetensors", "wieght": 1.0}]
    with pytest.raises(SpecError) as info:
        parse_spec(data, "test.toml")
    problems = info.value.problems
    assert any(p.startswith("render.extra_loras.1.weight: got 9;") and "less than or equal to 4" in p for p in problems)
    assert any(p.startswith("render.extra_loras.2.name: got 'a:b';") and "<lora:NAME:WEIGHT>" in p for p in problems)
    assert any(p.startswith("render.extra_loras.2.wieght: unknown key") for p in problems)
    data["render"]["extra_loras"] = data["render"]["extra_loras"][:1] * 2
    with pytest.raises(SpecError) as info:
        parse_spec(data, "test.toml")
    assert info.value.problems == [
        "render.extra_loras: got [{'name': 'style', 'path': 'a.safetensors'}, "
        "{'name': 'style', 'path': 'a.safetensors'}]; "
        "extra_loras names must not repeat values; repeated: 'style'"]


def test_an_extra_lora_of_another_model_family_is_refused_before_any_work(world, tmp_path: Path) -> None:
    root, *_ = world
    data = small_sweep_data(tmp_path / "out")
    data["base_models"] = [{"name": "tiny-sd15", "path": "builtin:tiny-sd15"},
                           {"name": "tiny-sdxl", "path": "builtin:tiny-sdxl"}]
    data["render"]["extra_loras"] = [{"name": "style", "path": str(root / "loras" / "style.safetensors")}]
    with pytest.raises(InputError) as info:
        prepare_inputs(parse_spec(data))
    (problem,) = info.value.problems  # the SD1.5 model takes it; the SDXL one does not
    assert problem.startswith("render.extra_loras[0] (style) on base_models[1] (tiny-sdxl): ")
    assert "32-wide text embeddings" in problem and "UNet 64" in problem
    assert not (tmp_path / "out" / "small").exists()


def test_lora_fit_reads_text_encoder_widths_from_both_spellings(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tasks.lora.compatibility import lora_fit_problems

    down, up = torch.zeros(2, 32), torch.zeros(32, 2)
    fits = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up}
    save_file(fits, str(tmp_path / "te.safetensors"))
    assert lora_fit_problems(tmp_path / "te.safetensors", tiny_model_dir) == []
    wide = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 48),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down}
    save_file(wide, str(tmp_path / "xl.safetensors"))
    assert lora_fit_problems(tmp_path / "xl.safetensors", tiny_model_dir) == [
        "its text encoder layers read width 48, the model's text_encoder 32",
        "it has second text encoder layers (an SDXL LoRA) and the model has no text_encoder_2"]
