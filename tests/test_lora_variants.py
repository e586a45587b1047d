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
from peft import LoraConfig, set_peft_model_state_dict
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
from tasks.models.sd_scripts_names import sgm_module_name
from tasks.models.text_conditioning import text_encoders
from tasks.preflight import prepare_inputs
from tasks.sweep.load import SpecError, parse_spec
from tasks.sweep.plan import training_runs
from tasks.train.loop import ADAPTER, add_adapters, fit_lora
from tasks.train.run import train_lora
from tests.conftest import small_sweep_data

LAYOUTS = tomllib.loads((Path(__file__).parent / "data" / "loader_key_layouts.toml").read_text())
VARIANTS = ("dora", "loha", "lokr")
# The saved adapters the module's tests check: (label, network, base model, extra training options).
SAVED = [("dora", "dora", "tiny-sd15", {}), ("dora-output", "dora", "tiny-sd15", {"dora_axis": "output"}),
         ("loha", "loha", "tiny-sd15", {}), ("lokr", "lokr", "tiny-sd15", {}), ("dora-sdxl", "dora", "tiny-sdxl", {})]
PROMPT = "a photo of zqx"
# DoRA runs' ids from before training.dora_axis existed (the code at its parent commit, small_sweep_data with
# network = "dora", ranks 2 and 4): they trained per output row, so dora_axis = "output" must keep them.
DORA_IDS_BEFORE_AXIS = ["tiny-sd15-r2-473aff7daf", "tiny-sd15-r4-ab2a24c3e5"]


def render(pipe, seed: int = 7) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=7.0, width=64, height=64, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images[0]


def planned(out: Path, network: str, model: str = "tiny-sd15", **training):
    data = small_sweep_data(out, ranks=[4], alpha=2.0, network=network, **training)
    data["base_models"] = [{"name": model, "path": f"builtin:{model}"}]
    spec = parse_spec(data)
    inputs = prepare_inputs(spec)
    return inputs, training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)[0]


@pytest.fixture(scope="module", params=SAVED, ids=[s[0] for s in SAVED])
def saved(request, tmp_path_factory: pytest.TempPathFactory):
    """A LoCon + text-encoder adapter of each type with random (non-zero) weights, saved as a checkpoint."""
    label, network, model, options = request.param
    out = tmp_path_factory.mktemp(label)
    inputs, run = planned(out, network, model, target_preset="locon", train_text_encoder=True, max_steps=1,
                          checkpoint_steps=[1], **options)
    pipe = load_pipeline(inputs.model_paths[model])
    pipe.set_progress_bar_config(disable=True)
    encoders = text_encoders(pipe)[0]
    params = add_adapters(pipe.unet, encoders, run)
    generator = torch.Generator().manual_seed(0)
    std = 0.05 if network == "dora" else 0.3  # LoHa and LoKr multiply two factors' entries
    magnitudes = {id(p) for m in (pipe.unet, *encoders) for n, p in m.named_parameters() if "magnitude" in n}
    for param in params:  # an untrained adapter changes nothing; these weights change every adapted layer
        kept = param.data if id(param) in magnitudes else 0  # DoRA's magnitudes: near the norms they start at
        param.data = torch.randn(param.shape, generator=generator) * std + kept
    for module in (pipe.unet, *encoders):
        module.eval()
    facts = TrainingFacts(tuple(scan_dataset(Path(inputs.dataset_path))), datetime.now(UTC))
    folder = save_checkpoint(run, pipe.unet, ADAPTER, 1, "ckpt", out / "ckpt", training_state={}, facts=facts,
                             text_encoders=encoders, family="sdxl" if model == "tiny-sdxl" else "sd15")
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


def kohya_unet_module(name: str, pipe) -> str:
    """The kohya module name of a diffusers UNet module path (SDXL in sd-scripts' sgm spelling)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    path = sgm_module_name(f"{name}.weight", pipe.unet.config).removesuffix(".weight") if sdxl else name
    return "lora_unet_" + path.replace(".", "_")


def test_every_exported_key_is_one_a1111_and_comfyui_load(saved) -> None:
    network, _, run, pipe, _, folder = saved
    modules, metadata = kohya_tensors(folder)
    unet_names = {kohya_unet_module(n, pipe) for n, m in pipe.unet.named_modules() if hasattr(m, "weight")}
    clip = LAYOUTS["comfyui"]["names"]["clip_map"]
    sd15 = run.base_model.name == "tiny-sd15"  # the name patterns below are SD1.x's (SDXL's: the slow test)
    for module, tensors in modules.items():
        if module.startswith("lora_unet_"):
            assert module in unet_names  # ComfyUI's map: every UNet weight, "." -> "_"
            assert not sd15 or any(re.match(p, module) for p in LAYOUTS["a1111"]["names"]["unet_patterns"]), module
        else:
            found = [re.match(p, module) for p in LAYOUTS["comfyui"]["names"]["text_patterns"]]
            assert any(m and m.group(2) in clip for m in found), module
            assert any(re.match(p, module) for p in LAYOUTS["a1111"]["names"]["text_patterns"]), module
        kind = "lora" if network == "dora" else network
        for loader in ("a1111", "comfyui"):
            layouts = [x for x in LAYOUTS[loader]["layouts"] if x["type"] == kind]
            assert any(accepted(set(tensors), x) for x in layouts), (loader, module, sorted(tensors))
        assert "alpha" in tensors and ("dora_scale" in tensors) == (network == "dora")
    assert any("conv1" in m or "in_layers_2" in m for m in modules)
    assert any(m.startswith(("lora_te_", "lora_te1_")) for m in modules)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert f'"algo": "{"lora" if network == "dora" else network}"' in metadata["ss_network_args"]
    if network == "dora":
        assert f'"wd_on_output": "{run.dora_axis == "output"}"' in metadata["ss_network_args"]


def loader_change(network: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The weight change A1111/ComfyUI compute from one LoHa or LoKr module (the rules in the test data's [scale])."""
    alpha = float(tensors["alpha"])
    if network == "loha":
        change = (tensors["hada_w1_a"] @ tensors["hada_w1_b"]) * (tensors["hada_w2_a"] @ tensors["hada_w2_b"])
        return change.reshape(weight.shape) * alpha / tensors["hada_w1_b"].shape[0]
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors["lokr_w2"] if "lokr_w2" in tensors else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    rank = next((tensors[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in tensors), None)
    scale = alpha / rank if rank else LAYOUTS["scale"]["lokr_full_factors_scale"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(weight.shape) * scale


def per_column(weight: torch.Tensor) -> torch.Tensor:
    """Each input column's L2 norm (over the output rows and the kernel), shaped (1, in[, 1, 1])."""
    norms = weight.transpose(0, 1).flatten(1).norm(dim=1)
    return norms.reshape(1, -1, *[1] * (weight.dim() - 2))


def per_row(weight: torch.Tensor) -> torch.Tensor:
    """Each output row's L2 norm, shaped (out, 1[, 1, 1])."""
    return weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))


def dora_weight(loader: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor,
                multiplier: float = 1.0) -> torch.Tensor:
    """The weight a loader renders from one DoRA module of a kohya file at LoRA weight `multiplier`, written from
    reading the loaders (the rules are in the test data's [dora] table):
    - AUTOMATIC1111, extensions-builtin/Lora/network.py (1.10): NetworkModule.finalize_updown scales
      lora_up @ lora_down by alpha / rank, apply_weight_decompose adds the weight, multiplies by dora_scale over the
      merged weight's norm per input column (whatever shape dora_scale has) and subtracts the weight again; the
      result is multiplied by the LoRA weight.
    - ComfyUI, comfy/weight_adapter/base.py weight_decompose: the same merged weight; a dora_scale whose first
      dimension is the weight's output size is per output row and divides by the base weight's row norms, any
      other per input column by the merged weight's; machine epsilon is added to the norm; then
      weight + strength x (decomposed - weight)."""
    rule = LAYOUTS["dora"][loader]
    up, down, scale = tensors["lora_up.weight"], tensors["lora_down.weight"], tensors["dora_scale"]
    merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * float(tensors["alpha"]) / down.shape[0]
    on_output = rule["output_axis_when_first_dim_is_out"] and scale.shape[0] == weight.shape[0]
    norm_of = {"merged": merged, "base": weight}[rule["output_norm_of" if on_output else "input_norm_of"]]
    norm = (per_row if on_output else per_column)(norm_of) + (torch.finfo(weight.dtype).eps if rule["eps"] else 0.0)
    return weight + multiplier * (merged * (scale / norm) - weight)


def lycoris_output_axis_weight(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """LyCORIS' own weight for a wd_on_output file (the merged weight's row norms): what peft's DoRA trains."""
    up, down = tensors["lora_up.weight"], tensors["lora_down.weight"]
    merged = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * float(tensors["alpha"]) / down.shape[0]
    return merged * tensors["dora_scale"] / per_row(merged)


def trained_changes(pipe) -> list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(name, base layer, base weight, trained weight) of each adapted UNet layer, from peft's own merge."""
    found = []
    for name, layer in pipe.unet.named_modules():
        if isinstance(layer, BaseTunerLayer):
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[ADAPTER])
            found.append((name, layer.get_base_layer(), base, layer.get_base_layer().weight.detach().clone()))
            layer.unmerge()
    return found


def test_exported_tensors_give_the_trained_weight_change(saved) -> None:
    network, _, run, pipe, _, folder = saved
    modules, _ = kohya_tensors(folder)
    kinds = set()
    for name, layer, base, trained in trained_changes(pipe):
        tensors = modules[kohya_unet_module(name, pipe)]
        if network != "dora":
            torch.testing.assert_close(loader_change(network, tensors, base), trained - base, atol=1e-5, rtol=1e-4)
        elif run.dora_axis == "input":  # both loaders render exactly the trained weight
            assert tensors["dora_scale"].shape == (1, base.shape[1], *[1] * (base.dim() - 2))
            for loader in ("a1111", "comfyui"):
                torch.testing.assert_close(dora_weight(loader, tensors, base), trained, atol=1e-5, rtol=1e-4)
            # at LoRA weight 0.6 too: the render path's base + w x (trained - base) is A1111's multiplier
            torch.testing.assert_close(dora_weight("a1111", tensors, base, 0.6), base + 0.6 * (trained - base),
                                       atol=1e-5, rtol=1e-4)
        else:  # per output row: LyCORIS' formula is the trained weight; A1111 reads it per column, silently wrong
            assert tensors["dora_scale"].shape == (base.shape[0], *[1] * (base.dim() - 1))
            torch.testing.assert_close(lycoris_output_axis_weight(tensors, base), trained, atol=1e-5, rtol=1e-4)
            if base.shape[0] != base.shape[1]:  # an (out, 1) scale over (1, in) norms broadcasts to (out, in)
                assert (dora_weight("a1111", tensors, base) - trained).abs().max() > 1e-3
        kinds.add(type(layer).__name__)
    assert kinds == {"Linear", "Conv2d"}


def test_saved_adapter_renders_like_the_trained_one_and_weight_0_like_the_base_model(saved) -> None:
    network, inputs, run, pipe, _, folder = saved
    assert saved_network(folder, DIFFUSERS_FILE) == network
    fresh = load_pipeline(inputs.model_paths[run.base_model.name])
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
    assert adapter_params(Path(inputs.model_paths[run.base_model.name]), run) == sum(p.numel() for p in params)


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
    assert ("dora_axis 'output' only applies with network = 'dora' (network is 'lora'); allowed: 'input' (the "
            "default) or 'output', with network = 'dora'") in problems_for(tmp_path, dora_axis="output")
    assert "Input should be 'input' or 'output'" in problems_for(tmp_path, network="dora", dora_axis="rows")


def test_lora_keeps_its_run_ids_and_each_type_gets_its_own(tmp_path: Path) -> None:
    def run_ids(**training: object) -> list[str]:
        spec = parse_spec(small_sweep_data(tmp_path, **training))
        inputs = prepare_inputs(spec)
        return [r.run_id for r in training_runs(spec, inputs.model_paths, inputs.dataset_path,
                                                inputs.dataset_fingerprint)]

    plain = run_ids()
    assert run_ids(network="lora") == plain == run_ids(network="lora", dora_axis="input")
    others = [run_ids(network=n) for n in VARIANTS] + [run_ids(network="lokr", lokr_factor=4)]
    assert len({tuple(ids) for ids in [plain, *others]}) == 5
    # DoRA per output row is what DoRA runs computed before dora_axis existed: their ids. Per input column (the
    # default) is another network: new ids, so an old DoRA run is never read as an input-axis one.
    assert run_ids(network="dora", dora_axis="output") == DORA_IDS_BEFORE_AXIS
    assert not set(run_ids(network="dora")) & set(DORA_IDS_BEFORE_AXIS)
    assert run_ids(network="dora") == run_ids(network="dora", dora_axis="input")


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



def test_diffusers_loads_only_the_types_it_computes_as_trained(saved) -> None:
    """diffusers reads a DoRA per output row; it refuses LoHa, LoKr and a DoRA per input column, whose config
    key `dora_axis` it does not know, instead of loading another network (README's table says so)."""
    network, inputs, run, _, _, folder = saved
    fresh = load_pipeline(inputs.model_paths[run.base_model.name])
    if network == "dora" and run.dora_axis == "output":
        fresh.load_lora_weights(folder, weight_name=DIFFUSERS_FILE)
        return
    with pytest.raises((TypeError, ValueError)) as info:
        fresh.load_lora_weights(folder, weight_name=DIFFUSERS_FILE)
    assert network != "dora" or "dora_axis" in str(info.value.__cause__)


def test_peft_refuses_a_magnitude_per_input_column_as_its_own_dora(saved) -> None:
    """Were the config key dropped (peft's from_peft_type drops unknown keys), the (1, in) magnitude still does
    not fit peft's DoRA (1-D for linear, (1, out, 1, 1) for convolutions, square layers included)."""
    network, inputs, run, _, _, folder = saved
    if network != "dora" or run.dora_axis != "input":
        return
    fresh = load_pipeline(inputs.model_paths[run.base_model.name])
    state = {k.removeprefix("unet."): v for k, v in load_file(str(folder / DIFFUSERS_FILE)).items()
             if k.startswith("unet.")}
    peft_dora = LoraConfig(r=run.rank, lora_alpha=run.alpha, use_dora=True, target_modules=list(run.target_modules))
    fresh.unet.add_adapter(peft_dora, adapter_name="peft_dora")
    with pytest.raises(RuntimeError, match="size mismatch"):
        set_peft_model_state_dict(fresh.unet, state, adapter_name="peft_dora")
