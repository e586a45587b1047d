"""The loops users write in notebooks, as baselines: plain diffusers, nothing cached.

Training encodes every batch with the VAE and the text encoder at every step; rendering loads the
pipeline and the LoRA again for every image and renders at batch size 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from peft import LoraConfig

from tasks.data.dataset import DatasetItem, load_training_image
from tasks.sweep.plan import RenderJobSpec, TrainingRunSpec

NOTEBOOK_ADAPTER = "notebook"


def notebook_train(pipe: StableDiffusionPipeline, run: TrainingRunSpec, items: list[DatasetItem], device: str,
                   on_step: Callable[[int], None]) -> None:
    """A diffusers-tutorial LoRA loop: same model, optimizer and sampling as ours, encoders run every step.

    Pixels and token ids are prepared once (as a DataLoader would hand them over); only the
    frozen encoders' per-step work differs from `tasks.train.run.fit_lora`.
    """
    torch.manual_seed(run.seed)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = torch.stack([torch.from_numpy(load_training_image(i.path, run.resolution)).permute(2, 0, 1)
                          for i in items])
    ids = pipe.tokenizer([i.caption for i in items], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    unet.add_adapter(LoraConfig(r=run.rank, lora_alpha=run.alpha, init_lora_weights="gaussian",
                                target_modules=list(run.target_modules)), adapter_name=NOTEBOOK_ADAPTER)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=1e-2)
    unet.train()
    for step in range(1, run.max_steps + 1):
        index = torch.randint(0, len(items), (run.batch_size,))
        with torch.no_grad():
            latents = vae.encode(pixels[index].to(device)).latent_dist.sample() * vae.config.scaling_factor
            embeddings = text_encoder(ids[index].to(device))[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (run.batch_size,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, embeddings).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # notebooks log the loss every step, which waits for the GPU like ours does
        on_step(step)
    unet.eval()


def notebook_render(job: RenderJobSpec, out_dir: Path, device: str) -> int:
    """Render the job's grid one image at a time, loading the pipeline and the LoRA for each image."""
    from tasks.lora.files import DIFFUSERS_FILE
    from tasks.render.samplers import make_scheduler
    from tasks.sweep.cells import grid_cells

    if job.checkpoint is None:
        raise ValueError(f"render {job.render_id}: the notebook baseline needs a LoRA checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = grid_cells(job)
    for number, cell in enumerate(cells):
        pipe = StableDiffusionPipeline.from_pretrained(
            job.base_model_path, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            local_files_only=True).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(job.checkpoint.lora_dir, weight_name=DIFFUSERS_FILE, adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[cell.lora_weight])
        pipe.scheduler = make_scheduler(cell.sampler, pipe.scheduler.config, seed=cell.seed)
        image = pipe(prompt=cell.prompt, negative_prompt=job.negative_prompt, num_inference_steps=cell.steps,
                     guidance_scale=cell.cfg_scale, width=job.width, height=job.height,
                     generator=torch.Generator(device="cpu").manual_seed(cell.seed)).images[0]
        image.save(out_dir / f"{number:05d}.png")
    return len(cells)


def bare_batched_render(pipe: StableDiffusionPipeline, job: RenderJobSpec) -> Callable[[], int]:
    """pipe() calls over the grid in the batches the render task uses (per LoRA weight, sampler, steps and
    CFG, at most MAX_BATCH images each), the pipeline and LoRA already loaded, nothing written.

    Returns the call to time (it returns the image count); what `render_job` adds on top is our overhead.
    """
    from tasks.render.job import MAX_BATCH
    from tasks.render.samplers import make_scheduler
    from tasks.sweep.cells import grid_cells

    cells = grid_cells(job)
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault((cell.lora_weight, cell.sampler, cell.steps, cell.cfg_scale), []).append(cell)
    batches = [(key, group[i : i + MAX_BATCH]) for key, group in groups.items()
               for i in range(0, len(group), MAX_BATCH)]
    base_config = dict(pipe.scheduler.config)

    def call() -> int:
        for (weight, sampler, steps, cfg), batch in batches:
            pipe.set_adapters(["lora"], adapter_weights=[weight])
            pipe.scheduler = make_scheduler(sampler, base_config, seed=[c.seed for c in batch])
            pipe(prompt=[c.prompt for c in batch], negative_prompt=[job.negative_prompt] * len(batch),
                 num_inference_steps=steps, guidance_scale=cfg, width=job.width, height=job.height,
                 generator=[torch.Generator(device="cpu").manual_seed(c.seed) for c in batch])
        return len(cells)

    return call

