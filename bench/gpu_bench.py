"""GPU throughput of full-size UNets: LoRA training it/s and render UNet it/s across the usual
speed-ups (SDPA, channels_last, fp16/bf16 vs fp32, batching, fused LoRA, torch.compile), against
published figures and the card's FLOP-bound limit.

One "it" is one denoising step of one image: with classifier-free guidance, a UNet call on two
latents. `--gpu-dry-run` runs every code path on CPU with toy UNets; its figures mean nothing.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from peft import LoraConfig

from bench.gpu_models import LORA_TARGETS, PUBLISHED_SD15_512_H100, UNetCase, count_flops, gpu_cases
from bench.measure import PeakCudaMemory, PeakRss, Row, cuda_sync, ratio_row, timed

SUITE = "gpu"
LORA_RANK = 16
ADAPTER = "bench"


@dataclass(frozen=True)
class GpuSettings:
    """How the GPU suite runs: device, sizes and repeat counts, optional torch.compile."""

    device: str
    dry_run: bool
    peak_tflops: float | None
    compile: bool = False
    compile_backend: str = "inductor"
    batch: int = 8
    warmup: int = 3
    iters: int = 10
    repeats: int = 3
    train_steps: int = 10


def bench_gpu(settings: GpuSettings) -> list[Row]:
    """Rows for every case: render it/s per variant, FLOPs and the FLOP-bound limit, training it/s."""
    from bench.table import format_table

    rows: list[Row] = []
    for case in gpu_cases(settings.dry_run):
        case_rows = _render_rows(case, settings) + _train_rows(case, settings)
        print(format_table(case_rows), file=sys.stderr, flush=True)  # kept even if a later case is cut off
        rows += case_rows
        _free_memory()
    return rows


def _render_rows(case: UNetCase, s: GpuSettings) -> list[Row]:
    unet = case.build(s.device, torch.float16)
    one, many = case.inputs(1, s.device, torch.float16), case.inputs(s.batch, s.device, torch.float16)
    flops = count_flops(lambda: _forward(unet, one), s.device)
    its: dict[str, tuple[float, ...]] = {"fp16 SDPA b1": _its(unet, one, 1, s)}
    with PeakCudaMemory() as gpu, PeakRss() as rss:
        its[f"fp16 SDPA b{s.batch}"] = _its(unet, many, s.batch, s)
    memory = gpu.peak_mb if s.device == "cuda" else rss.peak_mb
    unet.to(memory_format=torch.channels_last)
    its["fp16 SDPA channels_last b1"] = _its(unet, one, 1, s)
    unet.to(memory_format=torch.contiguous_format)
    sdpa_processors = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    its["fp16 classic attention (no SDPA) b1"] = _its(unet, one, 1, s)
    unet.set_attn_processor(sdpa_processors)
    its |= _lora_variants(unet, one, s)
    if s.compile and (case.reference or not s.dry_run):  # a dry run compiles once: it only checks the path
        its["fp16 SDPA torch.compile b1"] = _compiled_its(unet, one, s)
    unet.to(dtype=torch.bfloat16)
    its["bf16 SDPA b1"] = _its(unet, case.inputs(1, s.device, torch.bfloat16), 1, s)
    unet.to(dtype=torch.float32)  # what tasks.render.job.render_job loads today (load_pipeline's default)
    its["fp32 SDPA b1"] = _its(unet, case.inputs(1, s.device, torch.float32), 1, s)
    del unet
    rows = [Row(SUITE, f"{case.label} render {name}", "it/s", samples, _what(case, s)) for name, samples in its.items()]
    rows.append(Row("memory", f"{case.label} render b{s.batch}: peak memory", "MiB", (memory,), _memory_note(s)))
    return rows + _limit_rows(case, s, flops, its) + _published_rows(case, its)


def _lora_variants(unet, inputs: dict, s: GpuSettings) -> dict[str, tuple[float, ...]]:
    """it/s with a rank-16 LoRA as a separate adapter, then fused into the weights (pipe.fuse_lora)."""
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)), adapter_name=ADAPTER)
    its = {f"fp16 + LoRA r{LORA_RANK} unfused b1": _its(unet, inputs, 1, s)}
    unet.fuse_lora(lora_scale=1.0)
    its[f"fp16 + LoRA r{LORA_RANK} fused b1"] = _its(unet, inputs, 1, s)
    unet.unfuse_lora()
    unet.delete_adapters(ADAPTER)
    return its


def _compiled_its(unet, inputs: dict, s: GpuSettings) -> tuple[float, ...]:
    """it/s of torch.compile(unet); compilation happens in the warm-up calls and is not timed."""
    compiled = torch.compile(unet, backend=s.compile_backend)
    samples = _its(compiled, inputs, 1, s)
    torch._dynamo.reset()
    return samples


def _train_rows(case: UNetCase, s: GpuSettings) -> list[Row]:
    """LoRA training it/s with bf16 autocast (bf16 base weights) and in fp32, as tasks.train.run.fit_lora runs today."""
    rows: list[Row] = []
    for mixed in (True, False):
        precision = "bf16 autocast" if mixed else "fp32"
        try:
            samples, flops, memory = _train_its(case, s, mixed=mixed)
        except torch.cuda.OutOfMemoryError as err:  # a size that does not fit is a result, not a crash
            _free_memory()
            rows.append(Row(SUITE, f"{case.label} train LoRA r{LORA_RANK} {precision} b1", "it/s", (float("nan"),),
                            f"CUDA out of memory: {str(err).splitlines()[0][:80]}"))
            continue
        rows += [Row(SUITE, f"{case.label} train LoRA r{LORA_RANK} {precision} b1", "it/s", samples, _what(case, s)),
                 Row("memory", f"{case.label} train {precision}: peak memory", "MiB", (memory,), _memory_note(s))]
        if mixed and s.peak_tflops:
            limit = s.peak_tflops * 1e12 / flops
            rows += [Row(SUITE, f"{case.label} train FLOP-bound limit", "it/s", (limit,),
                         f"{s.peak_tflops:g} TFLOP/s / {flops / 1e9:.3g} GFLOP per step (fwd + bwd)"),
                     ratio_row(SUITE, f"{case.label} train bf16 / FLOP-bound limit", samples,
                               [limit] * len(samples), "fraction of the card's peak")]
    return rows


def _train_its(case: UNetCase, s: GpuSettings, *, mixed: bool) -> tuple[tuple[float, ...], int, float]:
    """Steps/s of rank-16 LoRA training (attention projections, batch 1, AdamW), FLOPs per step, peak MiB."""
    unet = case.build(s.device, torch.bfloat16 if mixed else torch.float32)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)), adapter_name=ADAPTER)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights in fp32, as mixed-precision LoRA scripts keep them
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = case.inputs(1, s.device, torch.float32, cfg=False)
    target = torch.randn_like(inputs["sample"])

    def step() -> None:
        with torch.autocast(device_type=s.device, dtype=torch.bfloat16, enabled=mixed):
            prediction = unet(**inputs).sample
        loss = F.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    flops = count_flops(step, s.device)
    for _ in range(s.warmup):
        step()
    with PeakCudaMemory() as gpu, PeakRss() as rss:
        seconds = [timed(lambda: [step() for _ in range(s.train_steps)], cuda_sync) for _ in range(s.repeats)]
    del unet, optimizer, params
    _free_memory()
    return tuple(s.train_steps / t for t in seconds), flops, gpu.peak_mb if s.device == "cuda" else rss.peak_mb


def _limit_rows(case: UNetCase, s: GpuSettings, flops: int, its: dict[str, tuple[float, ...]]) -> list[Row]:
    """FLOPs per it and, when the card's peak is known, the limit and how close each variant gets."""
    rows = [Row(SUITE, f"{case.label} UNet FLOPs per it (CFG: 2 latents)", "GFLOP", (flops / 1e9,),
                "torch.utils.flop_counter.FlopCounterMode, one forward")]
    if not s.peak_tflops:
        return rows
    limit = s.peak_tflops * 1e12 / flops
    rows.append(Row(SUITE, f"{case.label} render FLOP-bound limit", "it/s", (limit,),
                    f"{s.peak_tflops:g} TFLOP/s dense bf16 / FLOPs per it"))
    best_b1 = max((v for k, v in its.items() if k.endswith("b1")), key=statistics.median)
    for name, samples in (("best b1", best_b1), (f"fp16 SDPA b{s.batch}", its[f"fp16 SDPA b{s.batch}"])):
        rows.append(ratio_row(SUITE, f"{case.label} render {name} / FLOP-bound limit", samples,
                              [limit] * len(samples), "fraction of the card's peak"))
    return rows


def _published_rows(case: UNetCase, its: dict[str, tuple[float, ...]]) -> list[Row]:
    """Ours against published SD1.5 512 px H100 figures (a toy model in a dry run: not comparable)."""
    if not case.reference:
        return []
    ours = its["fp16 SDPA b1"]
    return [ratio_row(SUITE, f"{case.label} render fp16 SDPA b1 / published {name} ({value:g} it/s)", ours,
                      [value] * len(ours), "SD1.5 512 px batch 1 on an H100")
            for name, value in PUBLISHED_SD15_512_H100.items()]


def _forward(unet, inputs: dict) -> None:
    with torch.inference_mode():
        unet(**inputs)


def _its(unet, inputs: dict, images: int, s: GpuSettings) -> tuple[float, ...]:
    """Images x steps per second of `unet` on `inputs`, one sample per repeat of `iters` calls."""
    calls: Callable[[], None] = lambda: [_forward(unet, inputs) for _ in range(s.iters)]
    for _ in range(s.warmup):
        _forward(unet, inputs)
    return tuple(images * s.iters / timed(calls, cuda_sync) for _ in range(s.repeats))


def _what(case: UNetCase, s: GpuSettings) -> str:
    return f"{'toy, dry run on CPU: not a GPU figure' if s.dry_run else case.name + ' random weights'}"


def _memory_note(s: GpuSettings) -> str:
    return "torch.cuda.max_memory_allocated" if s.device == "cuda" else "process RSS peak (dry run)"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
