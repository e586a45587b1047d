"""Adapter types (`training.network`), in one place: the peft adapter each trains, its kohya/LyCORIS file layout
(what AUTOMATIC1111's built-in Lora extension and ComfyUI load), its `ss_network_*` metadata, its size, and how
a saved one is applied when rendering.

  lora  peft LoRA: lora_down/lora_up + alpha (kohya's networks.lora); diffusers loads it.
  dora  LoRA plus a learned magnitude per input column (`dora_axis = "input"`, tasks.lora.input_dora), saved as
        `dora_scale` (1, in[, 1, 1]): the weight A1111 and ComfyUI compute from the kohya file; diffusers cannot
        load its peft file. `dora_axis = "output"`: peft's use_dora, one magnitude per output row, saved as
        `dora_scale` (out, 1[, 1, 1]) with LyCORIS' wd_on_output=True; diffusers loads the peft file, A1111
        computes a different weight from the kohya file (README, known limits).
  loha  peft LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, saved as hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b.
  lokr  peft LoKr: kron(w1, w2) * alpha / rank, each factor full (lokr_w1, lokr_w2) or low-rank (lokr_w2_a/_b);
        `lokr_factor` picks the split of each dimension (-1: as close to its square root as it divides).
diffusers' load_lora_weights cannot read LoHa or LoKr, and scales only DoRA's low-rank part by the adapter weight.
So a checkpoint of a type other than LoRA renders as A1111 and ComfyUI apply it: the adapter's whole change of
each weight (peft's merge of the saved adapter) times the LoRA weight, added to the base weight; weight 0 is the
base weight itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, set_peft_model_state_dict
from peft.tuners import LoHaModel, LoKrModel, LoraModel
from peft.tuners.lokr.layer import factorization
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

from tasks.lora.input_dora import INPUT_AXIS, InputDoraConfig
from tasks.sweep.plan import TrainingRunSpec
from tasks.sweep.presets import RESNET_CONV

NETWORKS = ("lora", "dora", "loha", "lokr")
DIFFUSERS_NETWORKS = ("lora", "dora")  # the types diffusers' load_lora_weights reads (DoRA: per output row only)
# Tensor names each type adds per adapted layer (peft's and kohya's spell them alike but for LoRA/DoRA).
PEFT_TO_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora_magnitude_vector": "dora_scale"}
ADAPTER_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "hada_w1_a", "hada_w1_b", "hada_w2_a",
                  "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a",
                  "lokr_w2_b", "lokr_t2")
# kohya module-name prefix per model part (SD1.x's one text encoder is `lora_te_`, SDXL's two `lora_te1_`/`lora_te2_`).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
TUNERS = {"LORA": LoraModel, "LOHA": LoHaModel, "LOKR": LoKrModel}
CONFIGS = {"LORA": LoraConfig, "LOHA": LoHaConfig, "LOKR": LoKrConfig}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the peft configs in its LoRA files
PATCH_ADAPTER = "lora_sweep_patch"


def adapter_config(run: TrainingRunSpec, targets: Sequence[str], convs: Sequence[str] = ()) -> PeftConfig:
    """The peft config of `run`'s adapter on the modules named `targets`; `convs` (full module names, from
    spatial_convs) get the run's conv_rank / conv_alpha when it sets them. LoRA's is exactly the one runs
    trained with before adapter types existed (so their weights and ids stay as they were)."""
    conv_rank, conv_alpha = conv_rank_alpha(run)
    patterns = {}
    if convs and (run.conv_rank is not None or run.conv_alpha is not None):  # peft matches the keys as regexes
        patterns = {"rank_pattern": {re.escape(name): conv_rank for name in convs},
                    "alpha_pattern": {re.escape(name): conv_alpha for name in convs}}
    if run.network in ("lora", "dora"):
        dora = {"use_dora": True} if run.network == "dora" else {}
        config_class = InputDoraConfig if dora_axis(run) == INPUT_AXIS else LoraConfig
        return config_class(r=run.rank, lora_alpha=run.alpha, lora_dropout=run.lora_dropout,
                            init_lora_weights="gaussian", target_modules=list(targets), **dora, **patterns)
    if run.network == "loha":  # peft zeroes hada_w2_b, so an untrained LoHa changes nothing
        return LoHaConfig(r=run.rank, alpha=run.alpha, target_modules=list(targets), **patterns)
    # peft zeroes lokr_w1 (or lokr_w1_a), so an untrained LoKr changes nothing
    return LoKrConfig(r=run.rank, alpha=run.alpha, decompose_factor=run.lokr_factor, target_modules=list(targets),
                      **patterns)


def dora_axis(run: TrainingRunSpec) -> str | None:
    """The axis of a DoRA run's magnitude ("input" or "output"; a DoRA run from before training.dora_axis
    existed, which has none, trained per output row); None for other types."""
    if run.network != "dora":
        return None
    return run.dora_axis or "output"


def conv_rank_alpha(run: TrainingRunSpec) -> tuple[int, float]:
    """The rank and alpha of the run's k x k convolutions (LoCon): conv_rank / conv_alpha, else the run's own."""
    return (run.conv_rank if run.conv_rank is not None else run.rank,
            run.conv_alpha if run.conv_alpha is not None else run.alpha)


def targeted(name: str, targets: Sequence[str]) -> bool:
    """peft's rule for a list of target modules: the module's name is a target or ends with `.target`."""
    return any(name == t or name.endswith(f".{t}") for t in targets)


def spatial_convs(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the targeted convolutions with a kernel larger than 1 x 1, before or after peft wrapped them: the
    layers kohya's and LyCORIS' conv_dim / conv_alpha apply to (a 1 x 1 convolution counts as a linear layer)."""
    found = []
    for name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(base, torch.nn.Conv2d) and base.kernel_size != (1, 1) and targeted(name, targets):
            found.append(name)
    return found


def network_metadata(run: TrainingRunSpec) -> dict[str, str]:
    """`ss_network_module` and `ss_network_args` as kohya (LoRA) and LyCORIS (DoRA, LoHa, LoKr) write them; a
    run that adapts the resnet convolutions too (LoCon) records their rank and alpha (conv_dim, conv_alpha)."""
    conv = any(name in RESNET_CONV for name in run.target_modules) or (run.conv_rank, run.conv_alpha) != (None, None)
    conv_rank, conv_alpha = conv_rank_alpha(run)
    args: dict[str, str] = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)} if conv else {}
    if run.network == "lora":
        return {"ss_network_module": "networks.lora", "ss_network_args": json.dumps(args)}
    algo = {"algo": "lora" if run.network == "dora" else run.network}
    if run.network == "dora":  # LyCORIS' switches for DoRA; wd_on_output False: the magnitude per input column
        algo |= {"dora_wd": "True", "wd_on_output": str(dora_axis(run) == "output")}
    if run.network == "lokr":
        algo["factor"] = str(run.lokr_factor)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(algo | args)}


def layer_params(network: str, module: torch.nn.Module, rank: int, lokr_factor: int = -1,
                 dora_axis: str | None = "input") -> int:
    """Trainable parameters the adapter adds to one nn.Linear or nn.Conv2d (works on the meta device); DoRA's
    magnitude has one per input column or output row (`dora_axis`)."""
    if isinstance(module, torch.nn.Conv2d):
        out_dim, in_dim, kernel = module.out_channels, module.in_channels, module.kernel_size[0] * module.kernel_size[1]
    else:
        out_dim, in_dim, kernel = module.out_features, module.in_features, 1
    if network in ("lora", "dora"):
        magnitude = (in_dim if dora_axis == INPUT_AXIS else out_dim) if network == "dora" else 0
        return rank * (in_dim * kernel + out_dim) + magnitude
    if network == "loha":
        return 2 * rank * (in_dim * kernel + out_dim)
    (out_l, out_k), (in_m, in_n) = factorization(out_dim, lokr_factor), factorization(in_dim, lokr_factor)
    w1 = out_l * in_m  # peft's rule (tasks.lora.networks.adapter_config: decompose_both off): w1 is always full
    if rank >= max(out_k, in_n) / 2:
        return w1 + out_k * in_n * kernel
    return w1 + rank * (out_k + in_n * kernel)


def kohya_module(part: str, module_path: str, two_text_encoders: bool) -> str:
    """kohya's name of a module: part prefix + its diffusers/transformers path with `_` for `.`."""
    prefix = "lora_te1_" if part == "text_encoder" and two_text_encoders else KOHYA_PREFIXES[part]
    return prefix + module_path.replace(".", "_")


def split_key(key: str) -> tuple[str, str]:
    """A peft state-dict key as (module path, adapter tensor name)."""
    for name in ADAPTER_PARAMS:
        if key.endswith(f".{name}"):
            return key[: -len(name) - 1], name
    raise ValueError(f"{key!r} is not an adapter tensor of a known type")


def kohya_state_dict(network: str, rank: int, alpha: float, parts: dict[str, dict[str, torch.Tensor]],
                     unet_layers: Mapping[str, tuple[int, float]] | None = None,
                     dora_axis: str | None = None) -> dict[str, torch.Tensor]:
    """DoRA, LoHa and LoKr weights in the kohya/LyCORIS layout, from peft state dicts per part ("unet",
    "text_encoder", "text_encoder_2"); each module gets its `.alpha`. `unet_layers`: (rank, alpha) of UNet
    modules (by path) that have their own (LoCon's conv_rank / conv_alpha). `dora_axis`: DoRA's magnitude axis
    (networks.dora_axis). LoRA goes through tasks.lora.export."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    settings: dict[str, tuple[int, float]] = {}
    two = "text_encoder_2" in parts
    for part, state in parts.items():
        for key, value in state.items():
            path, name = split_key(key)
            module = kohya_module(part, path, two)
            settings[module] = (unet_layers or {}).get(path, (rank, alpha)) if part == "unet" else (rank, alpha)
            tensors = modules.setdefault(module, {})
            tensors[PEFT_TO_KOHYA.get(name, name)] = value.detach().float().cpu().contiguous()
    out = {}
    for module, tensors in modules.items():
        layer_rank, layer_alpha = settings[module]
        if "dora_scale" in tensors:  # per input column (1, in[, 1, 1]) or per output row (out, 1[, 1, 1])
            ndim = 4 if tensors["lora_down.weight"].dim() == 4 else 2
            shape = (1, -1, *[1] * (ndim - 2)) if dora_axis == INPUT_AXIS else (-1, *[1] * (ndim - 1))
            tensors["dora_scale"] = tensors["dora_scale"].reshape(shape)
        if network == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:
            # Both factors full: the loaders scale by 1 (no rank to divide alpha by), as LyCORIS itself does
            # (alpha = rank); peft's alpha / rank is folded into w1 instead.
            tensors["lokr_w1"] = tensors["lokr_w1"] * (layer_alpha / layer_rank)
            layer_alpha = float(layer_rank)
        out |= {f"{module}.{name}": tensor for name, tensor in tensors.items()}
        out[f"{module}.alpha"] = torch.tensor(float(layer_alpha))
    return out


def saved_network(lora_dir: str | Path, file_name: str) -> str:
    """The adapter type of a saved diffusers/peft file, from its peft configs ("lora" for files without them)."""
    with safe_open(str(Path(lora_dir) / file_name), framework="pt") as handle:
        configs = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    kinds = {v for k, v in configs.items() if k.endswith(".peft_type")}
    if kinds & {"LOHA", "LOKR"}:
        return "loha" if "LOHA" in kinds else "lokr"
    return "dora" if any(v for k, v in configs.items() if k.endswith(".use_dora")) else "lora"


class WeightPatches:
    """A saved adapter applied as A1111 and ComfyUI apply a network: base weight + weight x (adapted - base)."""

    def __init__(self, changes: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]) -> None:
        self.changes = changes  # (module, its base weight, the adapter's full change of it)

    def set_weight(self, weight: float) -> None:
        """Set every patched module to base + weight x change; at 0 exactly the base weight."""
        with torch.no_grad():
            for module, base, change in self.changes:
                module.weight.copy_(base)
                if weight != 0.0:
                    module.weight.add_(change, alpha=weight)


def load_weight_patches(pipe, lora_dir: str | Path, file_name: str) -> WeightPatches:
    """Read a saved diffusers/peft adapter file and turn it into weight patches on `pipe`'s UNet and text
    encoders: peft injects the adapter from its saved config, merges it to measure each weight's change, and
    is removed again, so the pipeline's modules stay plain for any extra LoRAs loaded after."""
    path = Path(lora_dir) / file_name
    state = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        packed = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    changes = []
    for part in ("unet", "text_encoder", "text_encoder_2"):
        prefix = f"{part}."
        part_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part_state:
            continue
        config = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
        component = getattr(pipe, part)
        if part != "unet" and not hasattr(component, "text_model"):  # transformers 5 dropped `text_model.`
            part_state = {k.removeprefix("text_model."): v for k, v in part_state.items()}
        changes += adapter_changes(component, saved_config(config), part_state)
    return WeightPatches(changes)


def saved_config(config: dict) -> PeftConfig:
    """The peft config a saved file's metadata holds; a DoRA per input column gets its own config class (peft's
    from_peft_type would drop the `dora_axis` key it does not know and build peft's per-output-row DoRA)."""
    if config.get("dora_axis") == INPUT_AXIS:
        return InputDoraConfig(**config)
    return CONFIGS[config["peft_type"]].from_peft_type(**config)


def adapter_changes(component: torch.nn.Module, config: PeftConfig, state: dict[str, torch.Tensor]
                    ) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """Each adapted module of `component` with its base weight and the adapter's change of it; `component`
    is left as it was (no adapter layers, no peft_config)."""
    before = getattr(component, "peft_config", None)
    tuner = TUNERS[str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type)](
        component, config, PATCH_ADAPTER)
    set_peft_model_state_dict(component, state, adapter_name=PATCH_ADAPTER)
    changes = []
    with torch.no_grad():
        for layer in tuned_layers(component.modules()):
            base_layer = layer.get_base_layer()
            base = base_layer.weight.detach().clone()
            layer.merge(adapter_names=[PATCH_ADAPTER])
            changes.append((base_layer, base, base_layer.weight.detach() - base))
            base_layer.weight.copy_(base)
            layer.merged_adapters.clear()
    tuner.unload()
    if before is not None:
        component.peft_config = before
    elif hasattr(component, "peft_config"):
        del component.peft_config
    return changes


def tuned_layers(modules: Iterable[torch.nn.Module]) -> list[BaseTunerLayer]:
    return [m for m in modules if isinstance(m, BaseTunerLayer)]
