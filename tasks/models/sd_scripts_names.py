"""The UNet LoRA module names kohya-ss/sd-scripts gives a model, derived from its UNet config.

sd-scripts (networks/lora.py, `LoRANetwork.create_modules`) wraps every `Linear` and `Conv2d` inside
the modules whose class is `Transformer2DModel` (attention projections, feed-forward, proj_in/out);
with `conv_dim` set also those inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (the 3x3 convs,
the time-embedding linear and the 1x1 shortcut). A module's name is `lora_unet_` + its path in
sd-scripts' own UNet, dots as underscores. For SD1.x that UNet (library/original_unet.py) uses
diffusers' names (`down_blocks_0_attentions_0_...`, resnet `conv1`); for SDXL it is the sgm/LDM UNet
(library/sdxl_original_unet.py): `input_blocks_4_1_...`, resnet `in_layers_2`, `emb_layers_1`,
`out_layers_3`, `skip_connection`, downsampler `op`, upsampler `conv`.

`sgm_module_name` renames a diffusers module path to the SDXL spelling (tasks.lora.export writes SDXL
kohya files with it), using the same block map as the single-file conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.models.single_file import UNET_RESNET_RENAMES, rename_by_prefix, unet_prefix_map

ATTENTION_LEAVES = ("to_q", "to_k", "to_v", "to_out_0")
DIFFUSERS_RESNET = {"in": "conv1", "emb": "time_emb_proj", "out": "conv2", "skip": "conv_shortcut"}
SGM_RESNET = {"in": "in_layers_2", "emb": "emb_layers_1", "out": "out_layers_3", "skip": "skip_connection"}


def transformer_modules(prefix: str, depth: int, attention_only: bool) -> list[str]:
    """One Transformer2DModel's wrapped modules: per block attn1/attn2 (q, k, v, out) and the feed-forward,
    then proj_in/proj_out (all of them linear or 1x1, so sd-scripts wraps them without conv_dim)."""
    leaves = tuple(f"attn{a}_{leaf}" for a in (1, 2) for leaf in ATTENTION_LEAVES)
    leaves += () if attention_only else ("ff_net_0_proj", "ff_net_2")
    names = [f"{prefix}_transformer_blocks_{d}_{leaf}" for d in range(depth) for leaf in leaves]
    return names if attention_only else names + [f"{prefix}_proj_in", f"{prefix}_proj_out"]


def resnet_modules(prefix: str, in_channels: int, out_channels: int, spelling: dict[str, str]) -> list[str]:
    """One ResnetBlock2D's wrapped modules: both 3x3 convs, the time-embedding linear, and the 1x1
    shortcut it has when its channels change."""
    parts = ["in", "emb", "out"] + (["skip"] if in_channels != out_channels else [])
    return [f"{prefix}_{spelling[p]}" for p in parts]


def per_level(value: int | list[int], levels: int) -> list[int]:
    return list(value) if isinstance(value, list | tuple) else [value] * levels


@dataclass(frozen=True)
class Layout:
    """How one UNet config spells and sizes its blocks for sd-scripts."""

    channels: list[int]
    per: int  # layers_per_block
    depth: list[int]  # transformer blocks per Transformer2DModel, per level
    attends: list[bool]  # the level has cross-attention
    sgm: bool
    attention_only: bool
    conv: bool

    @classmethod
    def of(cls, config: dict, family: str, attention_only: bool, conv: bool) -> Layout:
        channels = list(config["block_out_channels"])
        return cls(channels, config["layers_per_block"],
                   per_level(config.get("transformer_layers_per_block", 1), len(channels)),
                   ["CrossAttn" in t for t in config["down_block_types"]], family == "sdxl", attention_only, conv)

    def layer(self, sgm_where: str, diffusers_resnet: str, diffusers_attention: str, resnet: tuple[int, int],
              depth: int | None) -> list[str]:
        """A resnet (with conv) and, when `depth`, the transformer after it."""
        spelling = SGM_RESNET if self.sgm else DIFFUSERS_RESNET
        names = resnet_modules(f"{sgm_where}_0" if self.sgm else diffusers_resnet, *resnet, spelling) if self.conv else []
        if depth is not None:
            names += transformer_modules(f"{sgm_where}_1" if self.sgm else diffusers_attention, depth,
                                         self.attention_only)
        return names


def sd_scripts_unet_modules(config: dict, family: str, *, attention_only: bool = False,
                            conv: bool = False) -> set[str]:
    """sd-scripts' `lora_unet_*` module names for this UNet config: its default network (every linear of
    the transformers); with `conv` its conv_dim network (LoCon); with `attention_only` just the q/k/v/out
    projections. `family`: "sd15" (diffusers spelling) or "sdxl" (sgm spelling)."""
    lay = Layout.of(config, family, attention_only, conv)
    names: list[str] = []
    for i, width in enumerate(lay.channels):
        for j in range(lay.per):
            res_in = (lay.channels[i - 1] if i else lay.channels[0]) if j == 0 else width
            names += lay.layer(f"lora_unet_input_blocks_{1 + i * (lay.per + 1) + j}", f"lora_unet_down_blocks_{i}_resnets_{j}",
                               f"lora_unet_down_blocks_{i}_attentions_{j}", (res_in, width),
                               lay.depth[i] if lay.attends[i] else None)
        if i < len(lay.channels) - 1 and conv:
            names.append(f"lora_unet_input_blocks_{(i + 1) * (lay.per + 1)}_0_op" if lay.sgm
                         else f"lora_unet_down_blocks_{i}_downsamplers_0_conv")
    # The middle block is one flat list (resnet, transformer, resnet) in sd-scripts' SDXL UNet, as in LDM's:
    # `middle_block_0_in_layers_2`, no inner index as the input and output blocks have.
    mid = (lay.channels[-1], lay.channels[-1])
    spelling = SGM_RESNET if lay.sgm else DIFFUSERS_RESNET
    for k, where in ((0, "lora_unet_middle_block_0"), (1, "lora_unet_middle_block_2")):
        names += resnet_modules(where if lay.sgm else f"lora_unet_mid_block_resnets_{k}", *mid, spelling) if conv else []
    names += transformer_modules("lora_unet_middle_block_1" if lay.sgm else "lora_unet_mid_block_attentions_0",
                                 lay.depth[-1], attention_only)
    return set(names + up_blocks(lay))


def up_blocks(lay: Layout) -> list[str]:
    """The decoder half: up block u mirrors level n-1-u with one more layer, each resnet fed the skip
    connection beside the previous output (so its channels always change: it has a 1x1 shortcut)."""
    levels, names = len(lay.channels), []
    for u in range(levels):
        level = levels - 1 - u
        for j in range(lay.per + 1):
            names += lay.layer(f"lora_unet_output_blocks_{u * (lay.per + 1) + j}", f"lora_unet_up_blocks_{u}_resnets_{j}",
                               f"lora_unet_up_blocks_{u}_attentions_{j}", (1, 2),
                               lay.depth[level] if lay.attends[level] else None)
        if u < levels - 1 and lay.conv:
            slot = 2 if lay.attends[level] else 1  # after the transformer when the block has one
            names.append(f"lora_unet_output_blocks_{u * (lay.per + 1) + lay.per}_{slot}_conv" if lay.sgm
                         else f"lora_unet_up_blocks_{u}_upsamplers_0_conv")
    return names


def sgm_module_name(diffusers_name: str, config: dict) -> str:
    """A diffusers UNet module path (`down_blocks.1.attentions.0.proj_in.lora_A.weight`) in the sgm/LDM
    spelling sd-scripts uses for SDXL (`input_blocks.4.1.proj_in.lora_A.weight`); unchanged if outside
    the blocks."""
    renamed = rename_by_prefix(diffusers_name, unet_prefix_map(config), UNET_RESNET_RENAMES)
    return renamed if renamed is not None else diffusers_name


def sd_scripts_unet_state(state: dict, config: dict, family: str) -> dict:
    """A peft UNet state dict with SDXL module paths in sd-scripts' sgm spelling (what kohya's tools, A1111
    and ComfyUI read for SDXL); SD1.x is returned as is (its diffusers names convert to sd-scripts' own)."""
    if family != "sdxl":
        return state
    return {sgm_module_name(key, config): value for key, value in state.items()}
