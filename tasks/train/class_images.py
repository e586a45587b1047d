"""Class images for prior preservation: rendered once by the base model, cached by content, reused.

They live in `<cache>/class-images/<id>/` (`<cache>`: training.cache_dir, else `<output_dir>/cache`),
where `<id>` is a content id of everything that decides their pixels: the base model's files (sha256 of
each weight, config and tokenizer file), the class and negative prompts, sampler, steps, CFG, size and
dtype. Beside each PNG, `<seed + i>.safetensors` holds the latent the sampler produced, what training
uses by default (training.prior_preservation.train_on): the model's own sample, not the lossy VAE's
re-encoding of the PNG. The count is not in it: image i is `<seed + i>.png`, rendered with its own CPU generator, so a
run asking for 100 reuses the 50 an earlier run made and renders the other 50, and every run and sweep
with the same base model, prompt and seeds shares the folder. Each PNG is written atomically (with
A1111's infotext), and a claim on the folder (tasks.sweep.claims) keeps two runs, on any machine that
shares the output folder, from rendering the same images twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from storage.atomic import atomic_file, write_atomic
from tasks.data.dataset import DatasetItem, inspect_image
from tasks.render.png_metadata import ImageParameters, png_info
from tasks.render.samplers import make_scheduler
from tasks.sweep.claims import claim, record_holder
from tasks.sweep.hashes import file_sha256, model_hash
from tasks.sweep.ids import content_id
from tasks.sweep.plan import TrainingRunSpec
from tasks.sweep.prior_preservation import PriorPreservationSpec
from tasks.sweep.sampler_names import resolve_sampler

log = logging.getLogger(__name__)
CLASS_IMAGES_VERSION = 2  # bump when the rendering below changes: old folders then stop matching (2: latents)
BATCH = 8  # images per pipeline call; every image has its own generator, so no pixel depends on it
LOCK_FILE = "render.lock"
RENDERERS_FILE = "rendered_by.jsonl"  # one line per attempt that rendered missing images
ABOUT_FILE = "class_images.json"  # what made the folder, for people
DTYPE = "fp32"  # the training pipeline is loaded in fp32 (mixed precision casts it later, in setup)
MODEL_SUFFIXES = (".safetensors", ".json", ".txt")  # weights, configs, tokenizer vocabularies
LATENT_SUFFIX = ".safetensors"  # <seed>.safetensors: the sampler's latent of <seed>.png (scaled, as the UNet sees it)


def class_images_root(run: TrainingRunSpec) -> Path:
    """`<cache>/class-images`: beside the encoding cache, shared by every sweep under the output folder."""
    cache = Path(run.cache_dir) if run.cache_dir else Path(run.sweep_root).parent / "cache"
    return cache / "class-images"


def base_model_digest(path: str, config: str | None) -> str:
    """A content id of the files that decide what the base model renders: every weight, config and tokenizer
    file of a diffusers folder, or a single file and its config folder's files (by name and sha256, so a moved
    model keeps its id)."""
    base = Path(path)
    folders = [base] if base.is_dir() else [Path(config)] if config else []
    files = {} if base.is_dir() else {base.name: file_sha256(base)}
    for folder in folders:
        for file in sorted(folder.rglob("*")):
            relative = file.relative_to(folder)
            if file.is_file() and file.suffix in MODEL_SUFFIXES and not any(p.startswith(".") for p in relative.parts):
                files[str(relative)] = file_sha256(file)
    return content_id(files)


def class_images_dir(run: TrainingRunSpec) -> Path:
    """The run's class image folder, named by the content id of what decides their pixels."""
    prior = required(run)
    identity = {"model": base_model_digest(run.base_model_path, run.base_model.config), "prompt": prior.class_prompt,
                "negative": prior.negative_prompt, "sampler": prior.sampler, "steps": prior.steps,
                "cfg": prior.cfg_scale, "size": [run.resolution, run.resolution], "dtype": DTYPE,
                "version": CLASS_IMAGES_VERSION}
    return class_images_root(run) / content_id(identity)


def class_seeds(prior: PriorPreservationSpec) -> list[int]:
    return [prior.seed + i for i in range(prior.num_class_images)]


def required(run: TrainingRunSpec) -> PriorPreservationSpec:
    if run.prior_preservation is None:
        raise ValueError(f"run {run.run_id} has no training.prior_preservation")
    return run.prior_preservation


def ensure_class_images(run: TrainingRunSpec, pipe, device: str) -> list[DatasetItem]:
    """The run's class images as training items (caption: the class prompt), rendering the missing ones
    with `pipe` (the base model, before any LoRA is added) under the folder's claim."""
    prior = required(run)
    folder = class_images_dir(run)
    seeds = class_seeds(prior)
    items, missing = scan_class_images(folder, seeds, prior.class_prompt)
    if missing:
        with claim(folder / LOCK_FILE, f"class images {folder.name}"):
            items, missing = scan_class_images(folder, seeds, prior.class_prompt)  # another run may have made them
            if missing:
                record_holder(folder / RENDERERS_FILE, run_id=run.run_id, images=len(missing))
                write_about(run, folder)
                render_class_images(pipe, run, missing, folder, device)
                items, missing = scan_class_images(folder, seeds, prior.class_prompt)
    if missing:
        raise RuntimeError(f"class images {folder}: {len(missing)} image(s) still missing after rendering")
    log.info("run %s: %d class images of %r in %s", run.run_id, len(items), prior.class_prompt, folder)
    return items


def class_images_missing(run: TrainingRunSpec) -> bool:
    """Whether the run's prior preservation still has class images to render (False without it): then training
    loads the base model in fp32 to render them."""
    prior = run.prior_preservation
    if prior is None:
        return False
    return bool(scan_class_images(class_images_dir(run), class_seeds(prior), prior.class_prompt)[1])


def scan_class_images(folder: Path, seeds: list[int], prompt: str) -> tuple[list[DatasetItem], list[int]]:
    """The class images already on disk (readable, with their latent) as items, and the seeds still to render."""
    items, missing = [], []
    for seed in seeds:
        path = folder / f"{seed}.png"
        present = path.is_file() and path.with_suffix(LATENT_SUFFIX).is_file()
        item, problem = inspect_image(path, folder, prompt, min_size=1) if present else (None, "missing")
        if item is None:
            if problem != "missing":
                log.warning("class images: %s (%s); rendering it again", path, problem)
            missing.append(seed)
        else:
            items.append(item)
    return items, missing


def render_class_images(pipe, run: TrainingRunSpec, seeds: list[int], folder: Path, device: str) -> None:
    """Render `seeds` of the class prompt with the base model, one CPU generator per image (as the render
    stage does, so a class image equals the baseline render of the same prompt, seed and sampler); each
    image's latent is written beside its PNG."""
    prior = required(run)
    size = run.resolution
    sampler = resolve_sampler(prior.sampler)
    infotext = ImageParameters(prior.class_prompt, prior.negative_prompt, prior.steps, sampler.a1111_sampler,
                               sampler.a1111_schedule_type, prior.cfg_scale, prior.seed, size, size,
                               model_hash=model_hash(run.base_model_path), model_name=run.base_model.name,
                               extra={"RNG": "CPU"})  # every seed draws its noise on a CPU generator
    original = pipe.scheduler
    pipe.set_progress_bar_config(disable=True)  # one bar over the images instead of one per call
    progress = tqdm(total=len(seeds), desc=f"class images {folder.name}", leave=False)
    try:
        for start in range(0, len(seeds), BATCH):
            chunk = seeds[start : start + BATCH]
            pipe.scheduler = make_scheduler(prior.sampler, dict(original.config), seed=chunk)
            latents = render_batch(pipe, prior, chunk, size)
            for seed, latent, image in zip(chunk, latents, decode(pipe, latents), strict=True):
                write_atomic(folder / f"{seed}{LATENT_SUFFIX}", save({"latent": latent.float().cpu().contiguous()}))
                with atomic_file(folder / f"{seed}.png") as handle:
                    image.save(handle, format="PNG", pnginfo=png_info(replace(infotext, seed=seed),
                                                                      {"class_images": folder.name}))
            progress.update(len(chunk))
    finally:
        pipe.scheduler = original  # training builds its noise scheduler from this one
        progress.close()


def render_batch(pipe, prior: PriorPreservationSpec, seeds: list[int], size: int) -> torch.Tensor:
    """One pipeline call: the class prompt at each seed, as text (how the render stage passes a plain prompt);
    the final latents, before the VAE decodes them."""
    return pipe(prompt=[prior.class_prompt] * len(seeds), negative_prompt=[prior.negative_prompt] * len(seeds),
                num_inference_steps=prior.steps, guidance_scale=prior.cfg_scale, width=size, height=size,
                generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds], output_type="latent").images


def decode(pipe, latents: torch.Tensor) -> list:
    """The images the pipeline would have returned for `latents` (its own decode and post-processing)."""
    with torch.no_grad():
        pixels = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def class_latents(items: list[DatasetItem]) -> list[torch.Tensor]:
    """The sampler's latent of each class image (fp32, CPU, scaled as training's latents are)."""
    return [load_file(item.path.with_suffix(LATENT_SUFFIX))["latent"] for item in items]


def write_about(run: TrainingRunSpec, folder: Path) -> None:
    """`class_images.json`: the settings behind the folder's id, for a person looking at it."""
    prior = required(run)
    about = {"base_model": run.base_model.name, "base_model_path": run.base_model_path, "size": run.resolution,
             "dtype": DTYPE, "version": CLASS_IMAGES_VERSION,
             **prior.model_dump(exclude={"num_class_images", "prior_loss_weight", "seed", "train_on"}),
             "file_name": "<seed>.png, rendered with that seed; <seed>.safetensors: its latent"}
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / ABOUT_FILE, json.dumps(about, indent=1, sort_keys=True).encode())


def class_images_to_render(runs: list[TrainingRunSpec]) -> dict[Path, tuple[int, int]]:
    """Per class image folder the runs use: (side in px, images not on disk yet); for the disk estimate."""
    missing: dict[Path, tuple[int, set[int]]] = {}
    for run in runs:
        if run.prior_preservation is not None:
            folder = class_images_dir(run)
            seeds = {s for s in class_seeds(run.prior_preservation) if not (folder / f"{s}.png").is_file()}
            missing.setdefault(folder, (run.resolution, set()))[1].update(seeds)
    return {folder: (side, len(seeds)) for folder, (side, seeds) in missing.items()}
