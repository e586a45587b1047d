"""Check every input of a sweep before any expensive work, and materialise `builtin:` assets.

All problems (spec, base models, dataset, extra LoRA files, output folder, the sweep's estimated
size against the free space) are gathered and raised together, so a user fixes them in one pass
and no training starts on input that would fail later. A sweep that passes has the temporary
files of killed writers removed from its folders first (storage.cleanup).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from storage.cleanup import remove_leftovers
from storage.disk import existing_ancestor, free_bytes, size_text
from tasks.data.captions import captioner_problem
from tasks.data.dataset import MIN_IMAGE_SIDE, DatasetError, dataset_fingerprint, dataset_summary, load_clip_tokenizer
from tasks.data.demo_world import write_demo_dataset
from tasks.data.sources import load_dataset
from tasks.disk_space import MIN_FREE_BYTES, estimate_sweep_bytes, plan_text, space_problems
from tasks.lora.compatibility import lora_file_problems, lora_fit_problems
from tasks.models.base_model import validate_base_model
from tasks.models.memory import device_memory_bytes, render_weight_bytes, training_weight_bytes
from tasks.models.tiny_sd15 import ensure_tiny_model, ensure_world_model
from tasks.models.tiny_sdxl import ensure_tiny_sdxl
from tasks.render.caption_prompts import resolve_caption_prompts
from tasks.render.conditioning import clip_skip_problems
from tasks.score.clip_metrics import clip_folder_problems
from tasks.sweep.devices import cuda_device_count, resolve_precision, torch_device
from tasks.sweep.ids import content_id
from tasks.sweep.model_family import ModelFamily, model_family
from tasks.sweep.plan import PreparedInputs, planned_runs, preset_settings, sweep_root
from tasks.sweep.presets import memory_preset
from tasks.sweep.prompt_syntax import CHUNK_TOKENS
from tasks.sweep.spec import BUILTIN_PREFIX, DatasetSpec, SweepSpec
from tasks.train.class_images import class_images_root


class InputError(ValueError):
    """Every problem found in a sweep's inputs, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) with the sweep's inputs (nothing was run):\n{lines}")


def builtin_dir(spec: SweepSpec) -> Path:
    """Where builtin assets are materialised: beside the sweep's outputs, shared by all sweeps there."""
    return Path(spec.output_dir) / "builtin"


def prepare_inputs(spec: SweepSpec) -> PreparedInputs:
    """Validate base models, dataset and output folder; build builtin assets; raise InputError on any problem.

    A sweep refused here leaves nothing behind: builtin assets (and the output folder) this call made
    are removed again; what was there before is never touched.
    """
    builtins = builtin_dir(spec)
    new_folders = [p for p in (Path(spec.output_dir), builtins) if not p.exists()]
    had = set(builtins.iterdir()) if builtins.is_dir() else set()
    try:
        prepared = _prepare(spec)
    except InputError:
        for entry in set(builtins.iterdir()) - had if builtins.is_dir() else ():
            shutil.rmtree(entry, ignore_errors=True)
        for folder in reversed(new_folders):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    remove_interrupted_writes(spec, prepared)
    return prepared


def remove_interrupted_writes(spec: SweepSpec, inputs: PreparedInputs) -> list[Path]:
    """Remove the temporary files killed writers left in the sweep's folder, the builtin assets, the
    encoding caches and the class images (prior preservation); a live writer's are kept (storage.cleanup)."""
    runs = planned_runs(spec, inputs)
    folders = {sweep_root(spec), builtin_dir(spec), *(Path(r.cache_dir) for r in runs if r.cache_dir),
               *(class_images_root(r) for r in runs if r.prior_preservation)}
    removed = remove_leftovers(sorted(folders))
    if removed:
        print(f"removed {len(removed)} temporary file(s) that interrupted writes had left behind")
    return removed


def _prepare(spec: SweepSpec) -> PreparedInputs:
    problems = _output_problems(Path(spec.output_dir))
    if spec.training.cache_dir:
        problems += [f"training.{p} (or set training.cache = 'memory')"
                     for p in _output_problems(Path(spec.training.cache_dir), "cache_dir")]
    if problems:  # builtins are materialised under output_dir: nothing more can be checked
        raise InputError(problems)
    model_paths = {}
    for index, model in enumerate(spec.base_models):
        path, found = _model_path(spec, model.path, model.config)
        model_paths[model.name] = path
        if not found:
            model_dir, family = Path(model.config or path), model_family(path, model.config)
            found = _family_problems(spec, model_dir, family) or memory_problems(spec, model_dir, family)
        problems += [f"base_models[{index}] ({model.name}): {p}" for p in found]
    resolution = training_resolution(spec, model_paths, problems)
    held_out = max(c.training.validation_images for c in spec.training_configs())
    prepared_datasets = {}
    for name, ds in spec.dataset_specs():
        field = "dataset" if name is None else f"datasets ({name})"
        dataset_path, fingerprint, count, found = _dataset(spec, ds, resolution, field)
        problems += found
        prepared_datasets[name] = (dataset_path, fingerprint, count)
        if not found and held_out >= count:
            which = "the dataset" if name is None else f"dataset variant {name!r}"
            problems.append(f"training.validation_images = {held_out} leaves no training image "
                            f"({which} has {count}); allowed: 0 to {count - 1}")
    # with named variants, the base dataset is the first variant's (the no-LoRA baselines are scored against it)
    dataset_path, fingerprint, count = prepared_datasets.pop(None, None) or next(iter(prepared_datasets.values()))
    if spec.metrics.clip_model:
        problems += [f"metrics.clip_model: {p}" for p in clip_folder_problems(Path(spec.metrics.clip_model))]
    if spec.render.precision == "fp16" and spec.execution.runner == "threads":  # renders run in this process

        if not cuda_device_count():
            problems.append("render.precision = 'fp16' needs a CUDA GPU and this machine renders on the CPU; "
                            "allowed here: 'auto' (fp32 on the CPU), 'fp32' or 'bf16'")
    for index, extra in enumerate(spec.render.extra_loras):
        found = lora_file_problems(Path(extra.path))
        problems += [f"render.extra_loras[{index}] ({extra.name}): {p}" for p in found]
        if not found:
            problems += _lora_fit(spec, index, model_paths)
    problems += clip_skip_problems(spec, model_paths)
    if problems:
        raise InputError(problems)
    try:
        captions = resolve_caption_prompts(spec, dataset_path, resolution)
    except ValueError as err:  # every other input is good: this is the one problem left
        raise InputError([str(err)]) from err
    prepared = PreparedInputs(model_paths, dataset_path, fingerprint, count,
                              {name: (path, fp) for name, (path, fp, _) in prepared_datasets.items()},
                              caption_prompts=captions)
    estimate = estimate_sweep_bytes(spec, prepared)
    print(plan_text(spec, estimate))  # before any work: what the spec will produce
    free = free_bytes(Path(spec.output_dir))
    if free is not None and (problems := space_problems(Path(spec.output_dir), estimate, free)):
        raise InputError(problems)
    warn_long_prompts(spec)
    return prepared


def warn_long_prompts(spec: SweepSpec) -> None:
    """With prompt_syntax = "plain", a prompt past CLIP's 75 tokens is cut: say so, once, before any work."""
    if spec.render.prompt_syntax != "plain":
        return
    tokenizer = load_clip_tokenizer()
    for field, text in [*((f"render.prompts[{i}]", p) for i, p in enumerate(spec.prompt_texts())),
                        ("render.negative_prompt", spec.render.negative_prompt)]:
        count = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if count > CHUNK_TOKENS:
            print(f"warning: {field} has {count} tokens; with render.prompt_syntax = 'plain' only the first "
                  f"{CHUNK_TOKENS} condition the image (prompt_syntax = 'a1111' encodes all, in 75-token chunks)")


def _lora_fit(spec: SweepSpec, index: int, model_paths: dict[str, str]) -> list[str]:
    """An extra LoRA must fit every base model it is stacked on (a single file: its config folder)."""
    extra = spec.render.extra_loras[index]
    problems = []
    for number, model in enumerate(spec.base_models):
        folder = Path(model_paths[model.name])
        folder = folder if folder.is_dir() else Path(model.config) if model.config else None
        if folder is None:
            continue  # the base model's own problem is reported already
        problems += [f"render.extra_loras[{index}] ({extra.name}) on base_models[{number}] ({model.name}): {p}"
                     for p in lora_fit_problems(Path(extra.path), folder)]
    return problems


def _model_path(spec: SweepSpec, path: str, config: str | None) -> tuple[str, list[str]]:
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX) :]
        ensure = {"tiny-sd15-world": ensure_world_model, "tiny-sdxl": ensure_tiny_sdxl}.get(name, ensure_tiny_model)
        return str(ensure(builtin_dir(spec) / name)), []
    return path, validate_base_model(path, config=config)


def _family_problems(spec: SweepSpec, model_dir: Path, family: ModelFamily) -> list[str]:
    """Training options the model cannot use: a memory preset below its family's smallest tier, a LoRA
    rank wider than every layer it adapts (a rank wider than some of them is only warned about)."""
    trainings = [c.training for c in spec.training_configs()]
    for gib in sorted({t.memory_preset_gib for t in trainings if t.memory_preset_gib is not None}):
        try:
            memory_preset(gib, family)
        except ValueError as err:
            return [f"training.memory_preset_gib = {gib:g}: {err}"]
    widths = unet_widths(model_dir)
    if not widths:
        return []
    problems = []
    for rank in sorted({rank for t in trainings for rank in preset_settings(t, family)[1]["ranks"]}):
        if rank > max(widths):
            problems.append(f"training.ranks: rank {rank} is wider than every layer it adapts (the UNet's widths are "
                            f"{', '.join(map(str, widths))}); allowed: up to {max(widths)}")
        elif rank > min(widths):
            print(f"warning: training.ranks: rank {rank} is wider than the UNet's {min(widths)}-wide layers; there it "
                  f"adds parameters but no capacity (full rank is {min(widths)})")
    return problems


def memory_problems(spec: SweepSpec, model_dir: Path, family: ModelFamily) -> list[str]:
    """A base model whose frozen weights alone exceed this machine's memory, in training's or rendering's
    dtype (tasks.models.memory: a lower bound). Checked only when this machine runs the work (threads)."""
    if spec.execution.runner != "threads":
        return []
    device = torch_device()
    available = device_memory_bytes(device)
    problems = []
    if not spec.execution.train_deployment:
        precisions = {preset_settings(c.training, family)[1]["mixed_precision"] for c in spec.training_configs()}
        precision = max(precisions, key=lambda p: p == "no")  # fp32 weights, when any configuration asks for them
        need = training_weight_bytes(model_dir, precision)
        if need > available:
            problems.append(f"training.mixed_precision = {precision!r}: the frozen weights alone take "
                            f"{size_text(need)}, more than the {size_text(available)} of memory training gets "
                            f"here ({device}); allowed: 'fp16' or 'bf16' (half the bytes), a memory preset "
                            "(training.memory_preset_gib), or a machine with more memory")
    try:
        precision = resolve_precision(spec.render.precision, device)
    except ValueError:  # fp16 without CUDA: reported with the render checks
        return problems
    need = render_weight_bytes(model_dir, precision)
    if need > available:
        problems.append(f"render.precision = {spec.render.precision!r} ({precision}): the weights alone take "
                        f"{size_text(need)}, more than the {size_text(available)} of memory rendering gets "
                        f"here ({device}); allowed: a half precision on a GPU, or a machine with more memory")
    return problems


def unet_widths(model_dir: Path) -> list[int]:
    """The UNet's block widths (channels) from its config.json: a LoRA's rank is full at a layer's width."""
    try:
        config = json.loads((model_dir / "unet" / "config.json").read_text())
        return sorted({int(w) for w in config["block_out_channels"]})
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a single file without a config folder: base model validation reports it


def training_resolution(spec: SweepSpec, model_paths: dict[str, str], problems: list[str]) -> int:
    """The largest resolution any run trains at (a memory preset picks it per base model family), so
    the demo dataset is generated at it and the summary buckets for it."""
    trainings = [c.training for c in spec.training_configs()]
    if all(t.memory_preset_gib is None for t in trainings) or problems:
        return max(t.resolution for t in trainings)
    return max(preset_settings(t, model_family(model_paths[m.name], m.config))[1]["resolution"] for t in trainings
               for m in spec.base_models)


def _dataset(spec: SweepSpec, ds: DatasetSpec, resolution: int, field: str = "dataset",
             ) -> tuple[str, str, int, list[str]]:
    """Scan a dataset (the base one or a named variant) by its source, check the captioner folder, and
    print the dataset summary."""
    path = ds.path
    if path.startswith(BUILTIN_PREFIX):
        folder = builtin_dir(spec) / f"{path[len(BUILTIN_PREFIX):]}-{ds.trigger_word}-{resolution}"
        try:
            path = str(write_demo_dataset(folder, trigger=ds.trigger_word, size=resolution))
        except (ValueError, FileExistsError) as err:
            return path, "", 0, [f"{field}: path {path!r} at training.resolution {resolution}: {err}"]
    problem = captioner_problem(ds.captioner) if ds.captioner else None
    try:
        # Captions a captioner will write are not known yet: the fingerprint covers the captioner name instead.
        loaded = load_dataset(ds, Path(path), min_size=min(MIN_IMAGE_SIDE, resolution))
    except DatasetError as err:
        return path, "", 0, [f"{field}: {p}" for p in err.problems] + ([problem] if problem else [])
    if problem:
        return path, "", 0, [problem]
    items = loaded.items
    summary = dataset_summary(items, load_clip_tokenizer(), resolution=resolution, trigger_word=ds.trigger_word,
                              step=spec.training.bucket_step if spec.training.buckets else None,
                              skipped=loaded.skipped, not_images=loaded.not_images)
    source = ds.source if ds.source != "auto" else f"auto: {loaded.source}"
    print(f"dataset {path} ({source}):\n{summary.format()}")  # log_prints puts it in the Prefect log
    fingerprint = dataset_fingerprint(items)
    if ds.captioner and summary.missing_captions:
        fingerprint = content_id([fingerprint, ds.captioner])
    return path, fingerprint, len(items), []


def _output_problems(output_dir: Path, field: str = "output_dir") -> list[str]:
    existing = existing_ancestor(output_dir)
    if not existing.is_dir():
        return [f"{field} {str(output_dir)!r}: {str(existing)!r} is a file, not a folder"]
    try:  # access() says yes to root everywhere, /proc included: try a real write
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return [f"{field} {str(output_dir)!r}: folder {str(existing)!r} is not writable ({err.strerror}); "
                "choose a writable folder"]
    free = shutil.disk_usage(existing).free  # the sweep's own estimate is checked once its inputs are known
    if free < MIN_FREE_BYTES:
        return [f"{field} {str(output_dir)!r}: only {free / 2**20:.0f} MiB free on its disk; "
                f"need at least {MIN_FREE_BYTES / 2**20:.0f} MiB"]
    return []
