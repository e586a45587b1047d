"""Render one job's fixed-seed grid: a base model and one LoRA checkpoint (or none) over
samplers x steps x CFG x LoRA weights x prompts x seeds, with the spec's extra LoRAs (if any)
stacked at their own weights on every image, the baseline's included.

The pipeline and the LoRA are loaded once; weights switch with `set_adapters` and samplers
swap from the scheduler config. Every image has its own generator seeded from its seed, so no
image's noise depends on batch size, order or the rest of the grid (kernels may still round a few
pixels one level differently at another batch size: measured on the CPU, see
tests/test_render_writes.py). A PNG is written atomically and
found again on a re-run, so an interrupted job only renders what is missing; a claim per job
keeps two sweeps that share the output folder from rendering it twice. PNGs are encoded and
written on writer threads while the next batch denoises (at most one batch behind); the job
waits for every write, and a failed batch still keeps the images written before it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from storage.atomic import atomic_file
from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from tasks.data.dataset import load_clip_tokenizer
from tasks.lora.files import DIFFUSERS_FILE
from tasks.lora.networks import WeightPatches, load_weight_patches, saved_network
from tasks.models.base_model import MODEL_BUILD_LOCK
from tasks.models.pipeline_pool import borrowed_pipeline, copy_adapter_weights, unet_adapters
from tasks.render.conditioning import PromptConditioner, prompt_tokens
from tasks.render.grid_image import DEFAULT_Z_AXES, job_title, write_grid_images
from tasks.render.png_metadata import ImageParameters, png_info, read_png_parameters
from tasks.render.samplers import make_scheduler
from tasks.sweep.cells import Cell, grid_cells, image_id
from tasks.sweep.claims import claim, read_holders, record_holder
from tasks.sweep.devices import resolve_precision, torch_device
from tasks.sweep.hashes import lora_short_hash, model_hash
from tasks.sweep.plan import RenderJobSpec
from tasks.sweep.provenance import lora_sweep_version
from tasks.sweep.sampler_names import resolve_sampler

log = logging.getLogger(__name__)
ADAPTER = "lora"
EXTRA_ADAPTER_PREFIX = "extra_"
MAX_BATCH = 8
# Threads encoding and writing PNGs (images beside the next batch's denoising, then the grids): zlib releases
# the GIL, so a 512 px image's ~30 ms encode overlaps the GPU's (or the other cores') work.
WRITERS = min(4, os.cpu_count() or 1)
LOCK_FILE = "render.lock"  # the job's claim: one renderer at a time
RENDERERS_FILE = "rendered_by.jsonl"  # one line per attempt that got the claim with the job unfinished


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def render_job(job: RenderJobSpec) -> Path:
    """Render every missing image of the job and write its `images` Parquet file; returns that file.

    The job's claim (`images/<render_id>/render.lock`) makes this the only renderer of the job on
    every machine sharing the output folder: a second caller waits, then finds the finished job.
    """
    layout = SweepLayout(Path(job.sweep_root))
    table_file = layout.table_file("images", job.render_id)
    if table_file.exists():
        log.info("render %s: finished earlier, skipping", job.render_id)
        return table_file
    job = job.model_copy(update={"precision": resolve_precision(job.precision, torch_device())})
    out_dir = layout.render_dir(job.render_id)
    with claim(out_dir / LOCK_FILE, f"render {job.render_id}"):
        if table_file.exists():  # finished by the claim's previous holder
            log.info("render %s: finished by another renderer, skipping", job.render_id)
            return table_file
        record_holder(out_dir / RENDERERS_FILE, render_id=job.render_id)
        return _render_claimed(job, layout, out_dir, table_file)


def _render_claimed(job: RenderJobSpec, layout: SweepLayout, out_dir: Path, table_file: Path) -> Path:
    cells = grid_cells(job)
    names = [image_id(job, c) for c in cells]
    todo = [c for c, name in zip(cells, names) if not (out_dir / f"{name}.png").exists()]
    log.info("render %s: %d images, %d already on disk", job.render_id, len(cells), len(cells) - len(todo))
    seconds = _render_missing(job, todo, out_dir) if todo else {}
    tokenizer = load_clip_tokenizer()  # the CLIP BPE vocabulary SD1.x and SDXL share: counts only
    tokens = {p: prompt_tokens(p, job.prompt_syntax, tokenizer) for p in {c.prompt for c in cells}}
    rows = [_image_row(job, c, name, out_dir / f"{name}.png", tokens[c.prompt], seconds.get(name))
            for c, name in zip(cells, names)]
    _write_grids(job, layout, rows, out_dir)
    return write_rows("images", rows, table_file)


def read_renderers(layout: SweepLayout, render_id: str) -> list[dict[str, object]]:
    """Every recorded render attempt of a job, oldest first."""
    return read_holders(layout.render_dir(render_id) / RENDERERS_FILE)


def _write_grids(job: RenderJobSpec, layout: SweepLayout, rows: list[dict[str, object]], out_dir: Path) -> None:
    """X/Y-plot grid PNGs beside the images: LoRA weight x sampler, the no-LoRA column included."""
    baseline = layout.table_file("images", job.baseline_render_id) if job.baseline_render_id else None
    shared = pq.read_table(baseline).to_pylist() if baseline and baseline.exists() else []
    title = job_title(rows[0])
    # Clip skip joins the fixed values only when it varies, so grids of jobs without it keep their names.
    z_axes = (*DEFAULT_Z_AXES, "clip_skip") if len(job.clip_skips) > 1 else DEFAULT_Z_AXES
    write_grid_images([*shared, *rows], out_dir, title=title, z_axes=z_axes, workers=WRITERS)


def _render_missing(job: RenderJobSpec, todo: list[Cell], out_dir: Path) -> dict[str, float]:
    """Render `todo` and write their PNGs; each image's seconds of denoising and decoding, by image id."""
    # Half precision: weights and activations in that dtype; an SDXL VAE whose config asks for it
    # (force_upcast) still decodes in fp32 inside diffusers' pipeline. The pipeline comes from the
    # process's pool (tasks.models.pipeline_pool): loaded by the first job, clean again after each.
    plain = bool(job.checkpoint) and saved_network(job.checkpoint.lora_dir, DIFFUSERS_FILE) == "lora"
    with borrowed_pipeline(job.base_model_path, config=job.base_model.config, device=torch_device(),
                           torch_dtype=PRECISIONS[job.precision], keep_adapter=ADAPTER if plain else None) as pipe:
        patches = None if plain or not job.checkpoint else _network_patches(pipe, job)  # before the extras
        try:
            return _render_cells(pipe, job, todo, out_dir, patches)
        finally:
            if patches is not None:
                patches.set_weight(0.0)  # the base weights back, bit for bit, before the pipeline is reused


def _render_cells(pipe, job: RenderJobSpec, todo: list[Cell], out_dir: Path,
                  patches: WeightPatches | None) -> dict[str, float]:
    with ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix=f"png {job.render_id}") as writer:
        batch = _BatchRenderer(pipe, job, dict(pipe.scheduler.config), PromptConditioner(pipe, job, torch_device()),
                               _MetadataContext.build(job), out_dir, writer)
        try:
            _render_groups(pipe, job, todo, batch, patches)
        finally:
            batch.wait(0)  # every PNG of the rendered batches written (or its error raised), even after a failure
    return batch.seconds


def _render_groups(pipe, job: RenderJobSpec, todo: list[Cell], batch: _BatchRenderer,
                   patches: WeightPatches | None) -> None:
    extras = _load_loras(pipe, job, ours=patches is None)
    progress = tqdm(total=len(todo), desc=f"render {job.render_id}", leave=False)
    for key, group in itertools.groupby(todo, key=lambda c: (c.lora_weight, c.sampler, c.steps, c.cfg_scale,
                                                             c.clip_skip)):
        weight, sampler, steps, cfg, _ = key
        # Weight 0 of ours adds exactly 0.0, so it equals the baseline with the extras at their weights.
        ours = bool(job.checkpoint) and patches is None
        names = [ADAPTER, *extras] if ours else extras
        weights = [weight] * ours + [x.weight for x in job.extra_loras]
        if patches is not None:  # DoRA, LoHa, LoKr: weight x the adapter's whole change, as A1111 applies it
            patches.set_weight(weight)
        if names:
            pipe.set_adapters(names, adapter_weights=weights)
        cells = list(group)
        for start in range(0, len(cells), MAX_BATCH):
            for _, same in itertools.groupby(cells[start : start + MAX_BATCH], key=batch.conditioner.group_key):
                batch.render(list(same), sampler, steps, cfg)
            progress.update(len(cells[start : start + MAX_BATCH]))
    progress.close()


@dataclass(frozen=True)
class _BatchRenderer:
    """Renders cells that share sampler, steps, CFG and conditioning length in one pipeline call."""

    pipe: object
    job: RenderJobSpec
    base_config: dict
    conditioner: PromptConditioner
    context: _MetadataContext
    out_dir: Path
    writer: ThreadPoolExecutor  # PNG encoding and writing, beside the next batch's denoising
    seconds: dict[str, float] = field(default_factory=dict)  # image id -> its share of its batch's call
    pending: deque[list[Future]] = field(default_factory=deque)  # each batch's PNG writes, oldest first

    def wait(self, batches: int) -> None:
        """Wait until at most `batches` batches' writes are still queued; a failed write raises here."""
        while len(self.pending) > batches:
            for write in self.pending.popleft():
                write.result()

    def render(self, chunk: list[Cell], sampler: str, steps: int, cfg: float) -> None:
        job = self.job
        # One seed per image: SDE samplers get a noise sampler per image, so no pixel depends on the batch.
        self.pipe.scheduler = make_scheduler(sampler, self.base_config, seed=[c.seed for c in chunk])
        condition = self.conditioner.conditioning(chunk)
        t0 = time.perf_counter()
        images = self.pipe(
            **condition.kwargs, num_inference_steps=steps, guidance_scale=cfg, width=job.width, height=job.height,
            generator=[torch.Generator(device="cpu").manual_seed(c.seed) for c in chunk],
        ).images
        per_image = (time.perf_counter() - t0) / len(chunk)
        writes = []
        for cell, image in zip(chunk, images):
            params = self.context.parameters(job, cell)
            extra = {**params.extra, **condition.infotext, **self.conditioner.cell_infotext(cell)}
            params = dataclasses.replace(params, extra=extra)
            name = image_id(job, cell)
            self.seconds[name] = per_image
            writes.append(self.writer.submit(
                _save_png, image, self.out_dir / f"{name}.png", params,
                {"image_id": name, "render_id": job.render_id, "render_s": per_image,
                 "run_id": job.checkpoint.run_id if job.checkpoint else None,
                 "checkpoint_id": job.checkpoint.checkpoint_id if job.checkpoint else None}))
        self.pending.append(writes)
        self.wait(1)  # the writer may run one batch behind the denoising, no further (bounded memory)


def _network_patches(pipe, job: RenderJobSpec) -> WeightPatches:
    """Our checkpoint as weight patches (DoRA, LoHa, LoKr: tasks.lora.networks); needs plain modules."""
    with MODEL_BUILD_LOCK:
        return load_weight_patches(pipe, job.checkpoint.lora_dir, DIFFUSERS_FILE)


def _load_loras(pipe, job: RenderJobSpec, ours: bool = True) -> list[str]:
    """Load our checkpoint (if any, and `ours`) and each extra LoRA once, each under its own adapter; the extras'
    names."""
    extras = [f"{EXTRA_ADAPTER_PREFIX}{i}" for i in range(len(job.extra_loras))]
    with MODEL_BUILD_LOCK:
        if job.checkpoint and ours:
            _load_ours(pipe, job)
        for adapter, extra in zip(extras, job.extra_loras):
            file = Path(extra.path)
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=adapter, use_safetensors=True)
    return extras


def _load_ours(pipe, job: RenderJobSpec) -> None:
    """Our checkpoint as the adapter ADAPTER: its weights copied into the layers the previous job of this
    pipeline left when the two adapters have the same configuration (rank, alpha, targets, patterns; UNet
    only), else loaded afresh."""
    lora_dir = job.checkpoint.lora_dir
    file = Path(lora_dir) / DIFFUSERS_FILE
    if ADAPTER in unet_adapters(pipe):
        if _same_unet_adapter(pipe.unet.peft_config[ADAPTER].to_dict(), file):
            if not copy_adapter_weights(pipe.unet, file, ADAPTER):
                pipe.load_lora_weights(lora_dir, weight_name=DIFFUSERS_FILE, adapter_name=ADAPTER, hotswap=True)
            return
        pipe.unload_lora_weights()
    pipe.load_lora_weights(lora_dir, weight_name=DIFFUSERS_FILE, adapter_name=ADAPTER)


# The LoRA config fields that decide what an adapter computes (shapes, scales, which modules).
HOTSWAP_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora",
                  "use_rslora", "lora_bias", "bias", "fan_in_fan_out", "exclude_modules", "layers_to_transform",
                  "layers_pattern")


def _same_unet_adapter(loaded: dict, file: Path) -> bool:
    """Whether the file holds a UNet-only adapter configured exactly like `loaded` (a peft config dict)."""
    with safe_open(str(file), framework="pt") as handle:
        if any(key.startswith(("text_encoder.", "text_encoder_2.")) for key in handle.keys()):  # noqa: SIM118
            return False
        saved = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    wanted = {k.removeprefix("unet."): v for k, v in saved.items() if k.startswith("unet.")}

    def norm(value: object) -> object:
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    return bool(wanted) and all(norm(wanted.get(f)) == norm(loaded.get(f)) for f in HOTSWAP_FIELDS)


@dataclass(frozen=True)
class _MetadataContext:
    """Hashes and names written into every PNG's A1111 `parameters` chunk; LoRA hashes as A1111 shows them."""

    model_hash: str
    lora_name: str | None
    lora_hash: str | None
    extra_hashes: tuple[str, ...] = ()

    @classmethod
    def build(cls, job: RenderJobSpec) -> _MetadataContext:
        extras = tuple(lora_short_hash(x.path) for x in job.extra_loras)
        if not job.checkpoint:
            return cls(model_hash(job.base_model_path), None, None, extras)
        # The kohya file, the one A1111 loads: what A1111 shows for it (its sshs_model_hash).
        kohya = Path(job.checkpoint.lora_dir) / f"{job.checkpoint.checkpoint_id}.safetensors"
        return cls(model_hash(job.base_model_path), job.checkpoint.checkpoint_id, lora_short_hash(kohya), extras)

    def parameters(self, job: RenderJobSpec, cell: Cell) -> ImageParameters:
        ours = ((self.lora_name, cell.lora_weight, self.lora_hash),) if self.lora_name else ()
        loras = (*ours, *((x.name, x.weight, h) for x, h in zip(job.extra_loras, self.extra_hashes, strict=True)))
        sampler = resolve_sampler(cell.sampler)
        return ImageParameters(
            prompt=cell.prompt, negative_prompt=job.negative_prompt, steps=cell.steps,
            sampler=sampler.a1111_sampler, schedule_type=sampler.a1111_schedule_type, cfg_scale=cell.cfg_scale,
            seed=cell.seed, width=job.width, height=job.height, model_hash=self.model_hash,
            model_name=job.base_model.name, loras=loras, version=f"lora-sweep {lora_sweep_version()}",
            extra={"RNG": "CPU"},  # every seed draws its noise on a CPU generator (A1111 assumes GPU without it)
        )


def _save_png(image: Image.Image, path: Path, params: ImageParameters, ids: dict[str, object]) -> None:
    with atomic_file(path) as handle:
        image.save(handle, format="PNG", pnginfo=png_info(params, ids))


def _image_row(job: RenderJobSpec, cell: Cell, name: str, path: Path, tokens: int,
               seconds: float | None) -> dict[str, object]:
    """The `images` row of the cell's image `name`; `seconds` is its render time when this call rendered it, else
    read from its PNG."""
    if seconds is None:
        seconds = float(read_png_parameters(path)[1].get("render_s", 0.0))
    ckpt = job.checkpoint
    return {
        "sweep_id": job.sweep_id, "image_id": name, "render_id": job.render_id,
        "base_model": job.base_model.name, "run_id": ckpt.run_id if ckpt else None,
        "checkpoint_id": ckpt.checkpoint_id if ckpt else None, "rank": ckpt.rank if ckpt else None,
        "checkpoint_step": ckpt.step if ckpt else None, "sampler": cell.sampler, "steps": cell.steps,
        "lora_weight": cell.lora_weight if ckpt else 0.0, "cfg_scale": cell.cfg_scale,
        "prompt_index": cell.prompt_index, "prompt": cell.prompt, "negative_prompt": job.negative_prompt,
        "seed": cell.seed, "width": job.width, "height": job.height, "path": str(path),
        "render_s": seconds,
        "extra_loras": json.dumps([x.model_dump() for x in job.extra_loras]) if job.extra_loras else None,
        "precision": job.precision,  # resolved by render_job: the image id holds it
        "prompt_syntax": job.prompt_syntax, "prompt_tokens": tokens, "clip_skip": cell.clip_skip,
        "prompt_source": "caption" if cell.caption else "spec",
        "source_image": cell.caption.source_id if cell.caption else None,
        "held_out": cell.caption.held_out if cell.caption else None,
    }
