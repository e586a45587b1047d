"""Adapter types (training.network): DoRA, LoHa and LoKr beside LoRA. Each saves keys AUTOMATIC1111 and ComfyUI
load (tests/data/loader_key_layouts.toml, written from their source) whose weight change is the trained one,
renders at weight 0 exactly like the base model, reloads to the trained pixels and resumes bit for bit."""

from __future__ import annotations

import re
import shutil
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from tasks.data.dataset import scan_dataset
from tasks.lora.export import save_checkpoint
from tasks.lora.files import DIFFUSERS_FILE
from tasks.lora.kohya_metadata import TrainingFacts
from tasks.lora.networks import load_weight_patches, saved_network
from tasks.lora.size import adapter_params
from tasks.models.base_model import load_pipeline
from tasks.models.text_conditioning import text_encoders
from tasks.preflight import prepare_inputs
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import training_runs
from tasks.train.loop import ADAPTER, add_adapters, fit_lora
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data

LAYOUTS = tomllib.loads((Path(__file__).parent / "data" / "loader_key_layouts.toml").read_text())
VARIANTS = ("dora", "loha", "lokr")
PROMPT = "a photo of zqx"


def render(pipe, seed: int = 7) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.0, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def planned(out: Path, network: str, model: str = "tiny-sd15", **training):
    data = small_sweep_data(out, ranks=[4], alpha=2.0, network=network, **training)
    data["base_models"] = [{"name": model, "path": f"builtin:{model}"}]
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    return inputs, training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


@pytest.fixture(scope="module", params=VARIANTS)
def saved(request, tmp_path_factory: pytest.TempPathFactory):
    """A LoCon + text-encoder adapter of each type with random (non-zero) weights, saved as a checkpoint."""
    network = request.param
    out = tmp_path_factory.mktemp(network)
    inputs, run = planned(out, network, target_preset="locon", train_text_encoder=True, max_steps=1,
                          checkpoint_steps=[1])
    pipe = load_pipeline(inputs.model_paths["tiny-sd15"])
    pipe.set_progress_bar_config(disable=True)
    encoders = text_encoders(pipe)[0]
    params = add_adapters(pipe.unet, encoders, run)
    generator = torch.Generator().manual_seed(0)
    std = 0.05 if network == "dora" else 0.3  # LoHa and LoKr multiply two factors' entries
    for param in params:  # an untrained adapter changes nothing; these weights change every adapted layer
        param.data = torch.randn(param.shape, generator=generator) * std + (param.data if param.dim() == 1 else 0)
    for module in (pipe.unet, *encoders):
        module.eval()
    facts = TrainingFacts(tuple(scan_dataset(Path(inputs.dataset_path))), datetime.now(UTC))
    folder = save_checkpoint(run, pipe.unet, ADAPTER, 1, "ckpt", out / "ckpt", training_state={}, facts=facts,
                             text_encoders=encoders)
    return network, inputs, run, pipe, params, folder


def kohya_tensors(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    tensors = load_file(str(folder / "ckpt.safetensors"))
    with safe_open(str(folder / "ckpt.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, name = key.split(".", 1)  # as A1111's load_network splits them
        modules.setdefault(module, {})[name] = value
    return modules, metadata


def accepted(names: set[str], layout: dict) -> bool:
    """Does a loader module type (one layout of the test data) take a module with these tensor names?"""
    required = set(layout.get("required", ()))
    groups = [layout[k] for k in ("required_one_of", "required_one_of_2") if k in layout]
    chosen = [next((set(g) for g in group if set(g) <= names), None) for group in groups]
    if not required <= names or any(c is None for c in chosen):
        return False
    return names <= required | set().union(*chosen, set()) | set(layout["optional"])


def test_every_exported_key_is_one_a1111_and_comfyui_load(saved) -> None:
    network, _, _, pipe, _, folder = saved
    modules, metadata = kohya_tensors(folder)
    unet_names = {"lora_unet_" + n.replace(".", "_") for n, m in pipe.unet.named_modules() if hasattr(m, "weight")}
    clip = LAYOUTS["comfyui"]["names"]["clip_map"]
    for module, tensors in modules.items():
        if module.startswith("lora_unet_"):
            assert module in unet_names  # ComfyUI's map: every diffusers UNet weight, "." -> "_"
            assert any(re.match(p, module) for p in LAYOUTS["a1111"]["names"]["unet_patterns"]), module
        else:
            found = [re.match(p, module) for p in LAYOUTS["comfyui"]["names"]["text_patterns"]]
            assert any(m and m.group(2) in clip for m in found), module
            assert any(re.match(p, module) for p in LAYOUTS["a1111"]["names"]["text_patterns"]), module
        kind = "lora" if network == "dora" else network
        for loader in ("a1111", "comfyui"):
            layouts = [x for x in LAYOUTS[loader]["layouts"] if x["type"] == kind]
            assert any(accepted(set(tensors), x) for x in layouts), (loader, module, sorted(tensors))
        assert "alpha" in tensors and ("dora_scale" in tensors) == (network == "dora")
    assert any("resnets" in m and "conv1" in m for m in modules) and any(m.startswith("lora_te_") for m in modules)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert f'"algo": "{"lora" if network == "dora" else network}"' in metadata["ss_network_args"]


def loader_change(network: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change A1111/ComfyUI compute from one module's tensors (the rules in the test data's [scale])."""
    alpha = float(tensors["alpha"])
    if network == "loha":
        change = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])
        return change.reshape(weight.shape) * alpha / tensors["hada_w1_b"].shape[0]
    if network == "lokr":
        w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
        w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
        rank = next((tensors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors), None)
        scale = alpha / rank if rank else LAYOUTS["scale"]["lokr_full_factors_scale"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(weight.shape) * scale
    up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
    merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha / down.shape[0]
    norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(tensors["dora_scale"].shape)
    return merged * tensors["dora_scale"] / norm - weight  # magnitude per output row (LyCORIS wd_on_output)


def test_exported_tensors_give_the_trained_weight_change(saved) -> None:
    network, _, _, pipe, _, folder = saved
    modules, _ = kohya_tensors(folder)
    checked = 0
    for name, layer in pipe.unet.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        base = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=[ADAPTER])
        trained = layer.get_base_layer().weight.detach() - base
        layer.unmerge()
        expected = loader_change(network, modules["lora_unet_" + name.replace(".", "_")], base)
        torch.testing.assert_close(expected, trained, atol=1e-5, rtol=1e-4)
        checked += 1
    assert checked > 20


def test_saved_adapter_renders_like_the_trained_one_and_weight_0_like_the_base_model(saved) -> None:
    network, inputs, _, pipe, _, folder = saved
    assert saved_network(folder, DIFFUSERS_FILE) == network
    fresh = load_pipeline(inputs.model_paths["tiny-sd15"])
    fresh.set_progress_bar_config(disable=True)
    base = render(fresh)
    patches = load_weight_patches(fresh, folder, DIFFUSERS_FILE)
    assert not any(isinstance(m, BaseTunerLayer) for m in fresh.unet.modules())  # plain modules for extras
    patches.set_weight(1.0)
    trained = render(pipe)
    assert np.abs(trained - base).max() > 0.05
    np.testing.assert_allclose(render(fresh), trained, atol=1e-4)
    patches.set_weight(0.0)
    assert np.array_equal(render(fresh), base)


def test_parameter_estimate_counts_what_peft_trains(saved) -> None:
    _, inputs, run, _, params, _ = saved
    assert adapter_params(Path(inputs.model_paths["tiny-sd15"]), run) == sum(p.numel() for p in params)


def problems_for(tmp_path: Path, **training: object) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(small_sweep_data(tmp_path, **training), "test.toml")
    return str(info.value)


def test_options_a_network_cannot_use_are_refused_before_any_work(tmp_path: Path) -> None:
    message = problems_for(tmp_path, network="loha", lora_dropout=0.1, lokr_factor=4)
    assert ("lokr_factor 4 only applies with network = 'lokr' (network is 'loha'); allowed: -1 (automatic) or a "
            "factor of 1 or more, with network = 'lokr'") in message
    assert "lora_dropout 0.1 does not apply to network 'loha'; allowed: lora_dropout 0, or network 'lora' or 'dora'" \
        in message
    assert "lokr_factor 0 is not a factor" in problems_for(tmp_path, network="lokr", lokr_factor=0)
    assert "Input should be 'lora', 'dora', 'loha' or 'lokr'" in problems_for(tmp_path, network="oft")


def test_lora_keeps_its_run_ids_and_each_type_gets_its_own(tmp_path: Path) -> None:
    def run_ids(**training: object) -> list[str]:
        spec = parse_spec(small_sweep_data(tmp_path, **training))
        inputs = prepare_inputs(spec)
        return [r.run_id for r in training_runs(spec, inputs.model_paths, inputs.dataset_path,
                                                inputs.dataset_fingerprint)]

    plain = run_ids()
    assert run_ids(network="lora") == plain
    others = [run_ids(network=n) for n in VARIANTS] + [run_ids(network="lokr", lokr_factor=4)]
    assert len({tuple(ids) for ids in [plain, *others]}) == 5


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("network", VARIANTS)
def test_each_type_trains_saves_reloads_and_resumes_bit_for_bit(tmp_path: Path, network: str, model: str) -> None:
    inputs, run = planned(tmp_path, network, model, max_steps=12, checkpoint_steps=[6, 12], learning_rate=2e-2,
                          train_text_encoder=True)
    result = train_lora(run)
    last = Path(result.checkpoints[-1].lora_dir)
    uninterrupted = load_file(str(last / DIFFUSERS_FILE))
    tables = tmp_path / "small" / "tables"
    row = pq.read_table(tables / "runs" / f"{run.run_id}.parquet").to_pylist()[0]
    assert row["network"] == network and row["trainable_params"] == adapter_params(Path(inputs.model_paths[model]), run)
    kohya_modules = {k.split(".")[0] for k in load_file(str(last / f"{run.run_id}-s12.safetensors"))}
    if model == "tiny-sdxl":  # sd-scripts' sgm spelling, the one A1111 and ComfyUI map right for SDXL
        unet = {m for m in kohya_modules if m.startswith("lora_unet_")}
        assert unet and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                          "lora_unet_output_blocks_")) for m in unet), sorted(unet)[:3]

    shutil.rmtree(last)  # as if the process died after the step-6 checkpoint
    for table in ("runs", "losses", "checkpoints"):
        (tables / table / f"{run.run_id}.parquet").unlink()
    train_lora(run)
    again = load_file(str(last / DIFFUSERS_FILE))
    assert again.keys() == uninterrupted.keys()
    assert all(torch.equal(again[k], uninterrupted[k]) for k in uninterrupted)

    trained = load_pipeline(inputs.model_paths[model])
    trained.set_progress_bar_config(disable=True)
    fit_lora(trained, run, scan_dataset(Path(inputs.dataset_path)), device="cpu", on_checkpoint=lambda *a: None)
    fresh = load_pipeline(inputs.model_paths[model])
    fresh.set_progress_bar_config(disable=True)
    base = render(fresh)
    patches = load_weight_patches(fresh, last, DIFFUSERS_FILE)
    patches.set_weight(1.0)
    np.testing.assert_allclose(render(fresh), render(trained), atol=1e-4)
    patches.set_weight(0.0)
    assert np.array_equal(render(fresh), base)
