"""DoRA with its magnitude per input column (`training.dora_axis = "input"`): the weight AUTOMATIC1111 computes.

A1111's built-in Lora extension (extensions-builtin/Lora/network.py) and ComfyUI (comfy/weight_adapter/base.py,
for a `dora_scale` of shape (1, in[, 1, 1])) apply a DoRA file as
    W' = (W + s B A) * m / ||W + s B A||_col      (s = alpha / rank; the norm over each input column)
with `m` the file's `dora_scale`, one magnitude per input column. peft's `use_dora` learns one per output row,
which those loaders read as something else. This is the same network as a peft custom LoRA layer: lora_A and
lora_B as peft's, the magnitude in `lora_magnitude_vector` (so peft saves, loads and counts it as DoRA's) with
shape (1, in) for linear and convolution layers alike, a shape peft's own DoRA never has (1-D for linear,
(1, out, 1, 1) for convolutions), so peft and diffusers refuse the tensor instead of misreading it.

Scaling a column is scaling an input: W' x = (W + s B A)(c * x) with c = m / ||W + s B A||_col, so the forward
adds W((c - 1) * x) + s B A(c * x) to the base layer's output. The norm is detached, as peft and the DoRA paper
do. An untrained adapter (B = 0) has m equal to the norms themselves: c is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Conv2d, LoraLayer, LoraVariant
from peft.tuners.lora.layer import Linear as LoraLinear

INPUT_AXIS = "input"


@dataclass
class InputDoraConfig(LoraConfig):
    """peft's LoraConfig with use_dora, trained and merged per input column. `dora_axis` is saved with the config:
    diffusers' LoraConfig does not know the key and refuses the file rather than load a different network."""

    dora_axis: str = field(default=INPUT_AXIS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.use_dora or self.dora_axis != INPUT_AXIS:
            raise ValueError(f"InputDoraConfig needs use_dora=True and dora_axis={INPUT_AXIS!r}")
        self._register_custom_module({torch.nn.Linear: InputDoraLinear, torch.nn.Conv2d: InputDoraConv2d})


class InputMagnitude(torch.nn.Module):
    """The learned magnitude of each input column, shape (1, in) (peft keeps DoRA's in `.weight`)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(magnitude, requires_grad=True)
        self.merged_scale: torch.Tensor | None = None  # the scale a merge used (not state: unmerge needs it)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each input column of a linear (out, in) or convolution (out, in, kh, kw) weight, as
    (1, in): over the output rows and the kernel, as A1111's apply_weight_decompose takes it."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).unsqueeze(0)


def as_columns(scale: torch.Tensor, weight_dim: int) -> torch.Tensor:
    """A (1, in) scale shaped to multiply a weight's columns: (1, in) or (1, in, 1, 1)."""
    return scale.reshape(1, -1, *[1] * (weight_dim - 2))


def low_rank_change(module: LoraLayer, adapter: str) -> torch.Tensor:
    """s B A in the weight's shape: lora_up @ lora_down over the flattened input and kernel, as the loaders
    compute it from the kohya file (a k x k convolution's lora_A holds the kernel, its lora_B is 1 x 1)."""
    down, up = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * module.scaling[adapter]


def column_scale(module: LoraLayer, adapter: str, base_weight: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A||_col, shape (1, in), in the adapter's dtype; the norm detached from the gradient."""
    magnitude = module.lora_magnitude_vector[adapter].weight
    merged = base_weight.to(magnitude.dtype) + low_rank_change(module, adapter).to(magnitude.dtype)
    return magnitude / column_norms(merged).detach()


class InputDoraVariant(LoraVariant):
    """peft's variant hooks (init, forward, merge, unmerge) for the per-input-column magnitude."""

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: object) -> None:
        base = module.get_base_layer()
        if getattr(base, "groups", 1) != 1 or getattr(base, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"DoRA per input column needs an ungrouped, zero-padded convolution; got {base}")
        if not module.lora_magnitude_vector:  # as peft's DoRA: the magnitude becomes a trainable adapter layer
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        with torch.no_grad():
            delta = low_rank_change(module, adapter_name).float()
            magnitude = column_norms(base.weight.float() + delta)
        module.lora_magnitude_vector[adapter_name] = InputMagnitude(magnitude.to(module.lora_A[adapter_name].weight))

    @staticmethod
    def merged_weight(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """(W + s B A) * c, in the weight's dtype; c is kept for unmerge."""
        scale = column_scale(module, active_adapter, orig_weight).detach()
        module.lora_magnitude_vector[active_adapter].merged_scale = scale  # unmerge divides by this very scale
        delta = low_rank_change(module, active_adapter)
        merged = (orig_weight.to(scale.dtype) + delta.to(scale.dtype)) * as_columns(scale, orig_weight.dim())
        return merged.to(orig_weight.dtype)

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return InputDoraVariant.merged_weight(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = InputDoraVariant.merged_weight(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        scale = module.lora_magnitude_vector[active_adapter].merged_scale
        delta = low_rank_change(module, active_adapter)
        weight = orig_weight.data.to(scale.dtype) / as_columns(scale, orig_weight.dim()) - delta.to(scale.dtype)
        return weight.to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: object) -> torch.Tensor:
        base = module.get_base_layer()
        x = module.lora_dropout[active_adapter](x)  # Identity without dropout; as peft's DoRA, dropout feeds both terms
        scale = column_scale(module, active_adapter, base.weight)
        shape = (-1,) if isinstance(base, torch.nn.Linear) else (-1, *[1] * (base.weight.dim() - 2))
        scale = scale.reshape(shape).to(x.dtype)
        weight = base.weight.to(x.dtype)
        if isinstance(base, torch.nn.Linear):
            columns = torch.nn.functional.linear(x * (scale - 1), weight)
        else:
            columns = torch.nn.functional.conv2d(x * (scale - 1), weight, None, base.stride, base.padding,
                                                 base.dilation)
        lora = module.lora_B[active_adapter](module.lora_A[active_adapter](x * scale))
        return result + columns + lora * module.scaling[active_adapter]


class InputDoraLinear(LoraLinear):
    """peft's LoRA Linear whose DoRA variant keeps the magnitude per input column."""

    @property
    def lora_variants(self) -> dict:
        return {(): None, ("use_dora",): InputDoraVariant}


class InputDoraConv2d(Conv2d):
    """peft's LoRA Conv2d whose DoRA variant keeps the magnitude per input column."""

    @property
    def lora_variants(self) -> dict:
        return {(): None, ("use_dora",): InputDoraVariant}
