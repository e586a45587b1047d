"""Peak memory of full-size SD1.5 / SDXL training and rendering, measured at small resolutions on the CPU
and extrapolated to what each memory preset (tasks.sweep.presets) asks of an 8, 12, 16 and 24 GiB card.

Method (every figure says which part it is):
- frozen weights: counted exactly from the model's configs (tasks.models.memory), in training's dtypes
  (UNet and text encoders in the preset's half dtype, the VAE in fp32) and rendering's (all fp16);
- LoRA state: the preset's rank on the attention targets, fp32 weight + gradient + two AdamW moments;
- training activations: the bytes autograd saves for the backward pass in one training step (bf16 autocast
  forward of the UNet with a LoRA, frozen weights in bf16, batch 1; weights excluded, each storage once),
  counted with saved-tensor hooks at 32 and 64 px with gradient checkpointing off and on, fitted as
  a + b * pixels and scaled to the preset's resolution and batch. On the tiny SDXL UNet this fit predicts the
  count at 256 px within 0.1%. Linear in pixels is what memory-efficient attention (SDPA on CUDA) gives;
  the backward pass's transient gradients come on top (about one layer's activations), and with
  checkpointing the inputs each checkpointed block keeps are not counted.
- rendering: the UNet step's peak (batch 2: classifier-free guidance) and the VAE decode's, each the
  resident-memory high-water mark (VmHWM, reset first) above what was resident before, measured after one
  unmeasured call, in a child started with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the
  kernel; fitted the same way (the VAE in fp32 at 64 and 128 px: SDXL's VAE decodes in fp32, force_upcast;
  SD1.5's in fp16, so halved).
- a CUDA context of CUDA_CONTEXT_GIB on top (assumed, not measured here). `python -m bench.full_size_memory sd15|sdxl` prints the table.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
CARDS = (8, 12, 16, 24)
TRAIN_PROBES = (32, 64)
VAE_PROBES = (64, 128)
CUDA_CONTEXT_GIB = 0.5
LORA_STATE_BYTES = 16  # fp32 weight, gradient and AdamW's two moments
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) * 1024


def peak_above_now(fn: Callable[[], object]) -> int:
    """Bytes the call allocated at its peak above what was resident before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS
    before = status_bytes("VmRSS")
    fn()
    return status_bytes("VmHWM") - before


def probe(folder: Path) -> dict[str, dict[str, int]]:
    """In this process: the measured peaks (bytes) at the probe resolutions (see the module docstring)."""
    return {**unet_probe(folder), "vae_decode": vae_probe(folder)}


def unet_probe(folder: Path) -> dict[str, dict[str, int]]:
    """Training's saved bytes (checkpointing off and on) and the render step's peak, per probe resolution."""
    import torch  # the parent only reads JSON: torch is imported in the probing child alone
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from tasks.sweep.presets import ATTENTION

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(ATTENTION)))
    for param in unet.parameters():
        param.data = param.data.float() if param.requires_grad else param.data
    config = unet.config
    sdxl = config.addition_embed_type == "text_time"

    def inputs(resolution: int, batch: int) -> tuple:
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8)
        text = torch.randn(batch, 77, config.cross_attention_dim)
        added = ({"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)} if sdxl else None)
        return latents, torch.full((batch,), 500), text, added

    weights = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def train_step(resolution: int, checkpointing: bool) -> int:
        """Bytes the forward keeps for the backward pass, weights excluded (each storage counted once)."""
        unet.train()
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        latents, t, text, added = inputs(resolution, 1)
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            unet(latents, t, text, added_cond_kwargs=added)  # the graph (and what it saved) is freed on return
        return sum(seen.values())

    def render_step(resolution: int) -> None:
        unet.eval()
        latents, t, text, added = inputs(resolution, 2)
        with torch.no_grad():
            unet(latents.bfloat16(), t, text.bfloat16(),
                 added_cond_kwargs={k: v.bfloat16() for k, v in added.items()} if added else None)

    out: dict[str, dict[str, int]] = {"train": {}, "train_checkpointing": {}, "render_unet": {}}
    render_step(TRAIN_PROBES[0])  # once unmeasured, as in vae_probe
    for res in TRAIN_PROBES:
        out["train"][str(res)] = train_step(res, False)
        out["train_checkpointing"][str(res)] = train_step(res, True)
        out["render_unet"][str(res)] = peak_above_now(lambda res=res: render_step(res))
    return out


def vae_probe(folder: Path) -> dict[str, int]:
    """The VAE decode's peak above what was resident, in fp32, at the VAE probe resolutions."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval()
    out = {}
    for res in VAE_PROBES:
        latents = torch.randn(1, 4, res // 8, res // 8)
        with torch.no_grad():
            vae.decode(latents)  # once unmeasured: first calls allocate caches that later ones reuse
            out[str(res)] = peak_above_now(lambda latents=latents: vae.decode(latents))
    return out


def measure(folder: Path) -> dict[str, dict[str, int]]:
    """`probe` in a child process with the allocator set to return freed memory (see the module docstring)."""
    done = subprocess.run([sys.executable, "-m", "bench.full_size_memory", "--probe", str(folder)],
                          env={**os.environ, **PROBE_ENV}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: dict[str, int]) -> tuple[float, float]:
    """(bytes at zero pixels, bytes per pixel) through the two probes."""
    (r1, b1), (r2, b2) = sorted((int(r), b) for r, b in points.items())
    slope = (b2 - b1) / (r2 * r2 - r1 * r1)
    return b1 - slope * r1 * r1, slope


def at(points: dict[str, int], resolution: int, batch: int = 1) -> float:
    """The fit at `resolution` x `batch`; a part below the probes' noise (a negative fit) counts as 0."""
    constant, per_pixel = fit(points)
    return batch * (max(constant, 0.0) + max(per_pixel, 0.0) * resolution * resolution)


@dataclass(frozen=True)
class MemoryRow:
    """One card size's preset and the memory it needs, in GiB, for training and for rendering."""

    family: str
    gib: int
    preset: str | None  # "1024 px, batch 1, checkpointing, fp16, rank 8"; None below the family's smallest tier
    train_weights_gib: float = 0.0
    train_lora_gib: float = 0.0
    train_activations_gib: float = 0.0
    render_weights_gib: float = 0.0
    render_unet_gib: float = 0.0
    render_vae_gib: float = 0.0

    @property
    def train_total_gib(self) -> float:
        return self.train_weights_gib + self.train_lora_gib + self.train_activations_gib + CUDA_CONTEXT_GIB

    @property
    def render_total_gib(self) -> float:
        return self.render_weights_gib + max(self.render_unet_gib, self.render_vae_gib) + CUDA_CONTEXT_GIB


def memory_rows(family: str, folder: Path, measured: dict[str, dict[str, int]] | None = None) -> list[MemoryRow]:
    """The table's rows for `family` (its full-size diffusers folder), probing unless `measured` is given."""
    from tasks.models.memory import render_weight_bytes, training_weight_bytes
    from tasks.sweep.presets import memory_preset

    measured = measured or measure(folder)
    attention_lora = lora_params_per_rank(folder)
    rows = []
    for gib in CARDS:
        try:
            preset = memory_preset(gib, family)
        except ValueError:
            rows.append(MemoryRow(family, gib, None))
            continue
        res, batch = preset.resolution, preset.batch_size
        activations = measured["train_checkpointing" if preset.gradient_checkpointing else "train"]
        vae = at(measured["vae_decode"], res) / (1 if family == "sdxl" else 2)  # fp32 upcast vs fp16
        rows.append(MemoryRow(
            family, gib, f"{res} px, batch {batch}, {'checkpointing, ' if preset.gradient_checkpointing else ''}"
                         f"{preset.mixed_precision}, rank {preset.rank}",
            train_weights_gib=training_weight_bytes(folder, preset.mixed_precision) / GIB,
            train_lora_gib=attention_lora * preset.rank * LORA_STATE_BYTES / GIB,
            train_activations_gib=at(activations, res, batch) / GIB,
            render_weights_gib=render_weight_bytes(folder, "fp16") / GIB,
            render_unet_gib=at(measured["render_unet"], res) / GIB, render_vae_gib=vae / GIB))
    return rows


def lora_params_per_rank(folder: Path) -> int:
    """LoRA parameters per unit of rank on the attention targets: in + out width of every q/k/v/out projection."""
    from tasks.models.memory import meta_component
    from tasks.sweep.presets import ATTENTION

    unet = meta_component(folder / "unet" / "config.json")
    return sum(m.in_features + m.out_features for name, m in unet.named_modules()
               if name.endswith(tuple(f".{t}" for t in ATTENTION)))


def write_table(rows: list[MemoryRow], path: Path | None = None) -> str:
    """The rows as a Markdown table (written to `path` when given)."""
    header = ("| model | card | preset | train: weights + LoRA + activations + CUDA = total | fits | "
              "render (fp16): weights + max(UNet step, VAE decode) + CUDA = total | fits |")
    lines = [header, "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.preset is None:
            lines.append(f"| {r.family} | {r.gib} GiB | none (below the smallest tier: refused) | | | | |")
            continue
        lines.append(
            f"| {r.family} | {r.gib} GiB | {r.preset} | {r.train_weights_gib:.2f} + {r.train_lora_gib:.2f} + "
            f"{r.train_activations_gib:.2f} + {CUDA_CONTEXT_GIB} = {r.train_total_gib:.2f} | "
            f"{'yes' if r.train_total_gib <= r.gib else 'NO'} | {r.render_weights_gib:.2f} + "
            f"max({r.render_unet_gib:.2f}, {r.render_vae_gib:.2f}) + {CUDA_CONTEXT_GIB} = {r.render_total_gib:.2f} | "
            f"{'yes' if r.render_total_gib <= r.gib else 'NO'} |")
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def main(argv: list[str]) -> int:
    """`python -m bench.full_size_memory sd15|sdxl` (builds the model if needed); `--probe FOLDER` is the child."""
    if len(argv) == 2 and argv[0] == "--probe":
        print(json.dumps(probe(Path(argv[1]))))
        return 0
    from tasks.models.full_size import FAMILIES, ensure_full_size

    if len(argv) != 1 or argv[0] not in FAMILIES:
        print(f"usage: python -m bench.full_size_memory {'|'.join(FAMILIES)}", file=sys.stderr)
        return 2
    folder = ensure_full_size(argv[0])
    measured = measure(folder)
    print(json.dumps(measured))
    print(write_table(memory_rows(argv[0], folder, measured)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
