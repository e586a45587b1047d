"""Pretrain the embedded tiny SD1.5-architecture model on the synthetic demo world.

`python -m tasks.models.pretrain_tiny --out tasks/assets/tiny-sd15-world` starts from the seeded random
`tiny_components(seed)` and, on one CPU thread in about 20 minutes:
1. trains the VAE as an autoencoder (L1 + MSE reconstruction, small KL) on crops of world images, then
   folds a per-channel shift and one scale into its quant convs so that scaled latents have
   zero mean and unit variance under the unchanged `scaling_factor`;
2. freezes the VAE, caches latents, and trains the UNet and the CLIP text encoder together with
   the epsilon-prediction MSE on world captions (10% empty captions, so classifier-free guidance
   works). The text encoder is trained too, at a higher learning rate, so colour and shape words
   get distinct embeddings; EMA weights are what gets saved.
The result is an ordinary diffusers folder in fp16 safetensors plus `pretrain.json` (settings,
seed, timings, final losses, versions). The same seed and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from tasks.data.demo_world import GENERATOR_VERSION, world_samples
from tasks.models.tiny_sd15 import folder_size, tiny_components

RECORD = "pretrain.json"


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a pretraining run; written to pretrain.json beside the weights."""

    seed: int = 0
    size: int = 64
    num_images: int = 6000
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_crop: int = 32  # random crops (multiples of 8): 4x cheaper steps than whole 64 px images
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_latent_noise: float = 0.1  # extra latent noise (x latent std) so the decoder tolerates imperfect latents
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_lr: float = 3e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    offset_noise: float = 0.0  # per-(image, channel) constant noise: stops flat colours leaking from x_T's mean
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    threads: int = 1
    device: str = "cpu"
    max_seconds: float = 0.0  # > 0: stop the denoiser stage early at this wall time and save (recorded)
    data_processes: int = 1
    init_from: str = ""  # a folder this script wrote: continue from its weights (with --vae-steps 0: keep its VAE)  # processes drawing world images (the images do not depend on it)  # "cuda" trains on a GPU; random draws still come from the seeded CPU generator


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _world_slice(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    first, count, size, seed = args
    images, captions = [], []
    for image, caption, _ in world_samples(count, size, seed, first=first):
        images.append(np.asarray(image, dtype=np.uint8))
        captions.append(caption)
    return np.stack(images), captions


def world_data(cfg: PretrainConfig, processes: int = 1) -> tuple[torch.Tensor, list[str]]:
    """World images as uint8 NCHW plus their captions, drawn from the world generator's seed.

    Scene i depends only on (seed, i), so drawing slices in `processes` processes gives the same data.
    """
    chunk = 500
    slices = [(first, min(chunk, cfg.num_images - first), cfg.size, cfg.seed)
              for first in range(0, cfg.num_images, chunk)]
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            parts = list(pool.map(_world_slice, slices))
    else:
        parts = [_world_slice(s) for s in tqdm(slices, desc="world images")]
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1.0


def randn(shape, generator: torch.Generator, device: str) -> torch.Tensor:
    """Normal noise drawn on the CPU generator (same draws on every device), then moved."""
    return torch.randn(tuple(shape), generator=generator).to(device)


def train_vae(vae, pixels: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> float:
    """Autoencoder training: L1 + MSE reconstruction of sampled latents plus a small KL term.

    The VAE is convolutional, so it trains on random crops; the latent statistics and the
    denoiser use whole images.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.vae_steps, cfg.warmup_steps))
    recent: list[float] = []
    progress = tqdm(range(1, cfg.vae_steps + 1), desc="vae")
    for step in progress:
        index = torch.randint(0, len(pixels), (cfg.vae_batch,), generator=generator)
        top, left = (8 * torch.randint(0, (cfg.size - cfg.vae_crop) // 8 + 1, (2,), generator=generator)).tolist()
        x = to_unit_range(pixels[index, :, top:top + cfg.vae_crop, left:left + cfg.vae_crop])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * randn(posterior.mean.shape, generator, cfg.device)
        z = z + cfg.vae_latent_noise * z.detach().std() * randn(z.shape, generator, cfg.device)
        recon = vae.decode(z).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec_loss + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        recent = (recent + [rec_loss.item()])[-50:]
        if step % 100 == 0 or step == cfg.vae_steps:
            print(f"vae step {step}/{cfg.vae_steps}: reconstruction loss {np.mean(recent):.4f}", flush=True)
    vae.eval()
    return float(np.mean(recent))


@torch.no_grad()
def normalise_latent_space(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fold a per-channel shift and a global scale into quant_conv/post_quant_conv; return scaled latents.

    The decoder sees exactly the same latents as before (the change is undone in post_quant_conv),
    but `latent * scaling_factor` now has zero mean per channel and unit variance overall.
    """
    raw = []
    for chunk in pixels.split(64):
        posterior = vae.encode(to_unit_range(chunk)).latent_dist
        raw.append(posterior.mean + posterior.std * randn(posterior.mean.shape, generator, pixels.device.type))
    raw = torch.cat(raw)
    shift = raw.mean(dim=(0, 2, 3))
    k = 1.0 / (vae.config.scaling_factor * float((raw - shift[None, :, None, None]).std()))
    channels = vae.config.latent_channels
    quant, post = vae.quant_conv, vae.post_quant_conv
    post.bias += post.weight[:, :, 0, 0] @ shift
    post.weight /= k
    quant.weight[:channels] *= k
    quant.bias[:channels] = k * (quant.bias[:channels] - shift)
    quant.bias[channels:] += 2 * math.log(k)  # log-variance of a k-times larger latent
    # Exactly what the folded encoder gives for the same noise draws.
    latents = (raw - shift[None, :, None, None]) * k * vae.config.scaling_factor
    print(f"latent scale folded in: k={k:.3f}; scaled latents mean {latents.mean():.3f} std {latents.std():.3f}",
          flush=True)
    return latents


def train_denoiser(unet, text_encoder, tokenizer, scheduler_config, latents: torch.Tensor, captions: list[str],
                   cfg: PretrainConfig, generator: torch.Generator,
                   deadline: float | None = None) -> tuple[dict, dict, float, int]:
    """UNet + text encoder, epsilon-prediction MSE; returns the EMA state dicts, the final loss and
    the steps done (fewer than cfg.unet_steps only when `deadline`, a perf_counter time, passed)."""
    captions_or_empty = sorted(set(captions)) + [""]
    lookup = {c: i for i, c in enumerate(captions_or_empty)}
    caption_index = torch.tensor([lookup[c] for c in captions])
    tokens = tokenizer(captions_or_empty, padding="max_length", truncation=True,
                       max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(cfg.device)
    empty = lookup[""]
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    for module in (unet, text_encoder):
        module.requires_grad_(True).train()
    optimizer = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": cfg.unet_lr, "weight_decay": 1e-2},
        {"params": list(text_encoder.parameters()), "lr": cfg.text_lr, "weight_decay": 0.0},
    ])
    total = [cfg.unet_steps]  # shortened once, early, when the deadline cannot fit them all
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total[0], cfg.warmup_steps))
    ema = {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
           for name, m in (("unet", unet), ("text_encoder", text_encoder))}
    recent: list[float] = []
    progress = tqdm(range(1, cfg.unet_steps + 1), desc="unet+text")
    step, loop_started = 0, time.perf_counter()
    for step in progress:
        if step > total[0]:
            step -= 1
            break
        if deadline is not None and step == 101:  # fit the cosine schedule into the time left
            per_step = (time.perf_counter() - loop_started) / 100
            affordable = 100 + int((deadline - time.perf_counter()) / per_step)
            if affordable < total[0]:
                total[0] = max(affordable, 101)
                print(f"unet: {per_step * 1e3:.1f} ms/step; schedule shortened to {total[0]} steps", flush=True)
        if deadline is not None and time.perf_counter() > deadline + 30:
            print(f"unet: time limit reached after {step - 1} steps", flush=True)
            step -= 1
            break
        index = torch.randint(0, len(latents), (cfg.unet_batch,), generator=generator)
        which = caption_index[index].clone()
        which[torch.rand(cfg.unet_batch, generator=generator) < cfg.caption_dropout] = empty
        clean = latents[index]
        noise = randn(clean.shape, generator, cfg.device)
        noise = noise + cfg.offset_noise * randn((*clean.shape[:2], 1, 1), generator, cfg.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,),
                                  generator=generator).to(cfg.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(tokens[which])[0]).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        update_ema(ema, unet, text_encoder, min(cfg.ema_decay, (1 + step) / (10 + step)))
        recent = (recent + [loss.item()])[-100:]
        if step % 200 == 0 or step == total[0]:
            print(f"unet step {step}/{total[0]}: loss {np.mean(recent):.4f}", flush=True)
    return ema["unet"], ema["text_encoder"], float(np.mean(recent)), step


@torch.no_grad()
def update_ema(ema: dict[str, dict[str, torch.Tensor]], unet, text_encoder, decay: float) -> None:
    for name, module in (("unet", unet), ("text_encoder", text_encoder)):
        state = module.state_dict()
        floats = [k for k, v in state.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([ema[name][k] for k in floats], [state[k] for k in floats], 1.0 - decay)
        for key, value in state.items():
            if not value.dtype.is_floating_point:
                ema[name][key].copy_(value)


def save_model(components: dict, out: Path, record: dict) -> None:
    """Save an fp16 diffusers folder plus pretrain.json; diffusers upcasts on load with torch_dtype=float32."""
    pipe = StableDiffusionPipeline(**components)
    pipe.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    record = {**record, "size_bytes": folder_size(out)}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for path in out.rglob("*"):  # safetensors writes 0600 files; the folder is shared and committed
        path.chmod(0o755 if path.is_dir() else 0o644)


def pretrain(cfg: PretrainConfig, out: Path) -> dict:
    """Run both stages and save the model; returns the record written to pretrain.json."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    components = tiny_components(cfg.seed)
    parent = None
    if cfg.init_from:
        loaded = StableDiffusionPipeline.from_pretrained(cfg.init_from, torch_dtype=torch.float32)
        for name in ("unet", "vae", "text_encoder"):
            components[name] = getattr(loaded, name).requires_grad_(True)
        parent = json.loads((Path(cfg.init_from) / RECORD).read_text())
    for name in ("unet", "vae", "text_encoder"):
        components[name].to(cfg.device)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 as on CPU
    pixels, captions = world_data(cfg, processes=cfg.data_processes)
    pixels = pixels.to(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    vae_loss = train_vae(components["vae"], pixels, cfg, generator) if cfg.vae_steps else None
    vae_done = time.perf_counter()
    components["vae"].requires_grad_(False)
    latents = normalise_latent_space(components["vae"], pixels, generator)
    deadline = started + cfg.max_seconds if cfg.max_seconds > 0 else None
    unet_ema, text_ema, unet_loss, unet_steps_done = train_denoiser(
        components["unet"], components["text_encoder"], components["tokenizer"], components["scheduler"].config,
        latents, captions, cfg, generator, deadline)
    components["unet"].load_state_dict(unet_ema)
    components["text_encoder"].load_state_dict(text_ema)
    for name in ("unet", "text_encoder", "vae"):
        components[name].requires_grad_(False).eval().to("cpu")
    finished = time.perf_counter()
    record = {
        "script": "tasks.models.pretrain_tiny", "config": asdict(cfg), "world_generator_version": GENERATOR_VERSION,
        "vae_reconstruction_loss": vae_loss, "unet_final_loss": unet_loss, "unet_steps_done": unet_steps_done,
        "vae_seconds": round(vae_done - started, 1), "total_seconds": round(finished - started, 1),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "continued_from": parent,
        "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else "cpu",
    }
    save_model(components, out, record)
    print(f"saved {out} ({folder_size(out) / 1e6:.2f} MB) after {finished - started:.0f} s", flush=True)
    return record


def parse_args(argv: list[str]) -> tuple[PretrainConfig, Path]:
    parser = argparse.ArgumentParser(prog="python -m tasks.models.pretrain_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output diffusers folder")
    defaults = PretrainConfig()
    for field in fields(PretrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return PretrainConfig(**args), out


def main(argv: list[str]) -> int:
    cfg, out = parse_args(argv)
    pretrain(cfg, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
