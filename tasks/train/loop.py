"""The LoRA training loop, read top to bottom: `setup` -> `train_step` -> `train_loop`.

VAE latents and text embeddings are computed once (both encoders are frozen; tasks.train.encodings,
cached on disk by content hash unless `training.cache` says otherwise), then each step draws a
batch (from one aspect-ratio bucket when buckets are on), adds noise at a random timestep,
predicts it with the LoRA-adapted UNet and takes an AdamW step on the LoRA parameters only.
Options (all off by default, see TrainingSpec): LoRA dropout and wider target presets, an LR
schedule with warmup, gradient accumulation (a step = `gradient_accumulation_steps` micro-batches),
Min-SNR loss weighting, offset noise, gradient clipping, fp16/bf16 mixed precision, gradient checkpointing, 8-bit
AdamW and a text-encoder LoRA (the text encoders then run every step). Attention is diffusers'
default, PyTorch's scaled_dot_product_attention. SDXL base models train the same way, their UNet
also conditioned on the pooled text embedding and size ids (tasks.models.text_conditioning).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from peft import inject_adapter_in_model, set_peft_model_state_dict
from tqdm.auto import tqdm

from tasks.data.captions import training_caption
from tasks.data.dataset import DatasetItem, crop_sizes
from tasks.lora.networks import adapter_config, spatial_convs
from tasks.models.base_model import MODEL_BUILD_LOCK
from tasks.models.text_conditioning import encode_captions, text_encoders
from tasks.sweep.plan import TrainingRunSpec
from tasks.sweep.presets import TEXT_ENCODER_TARGETS
from tasks.train.class_images import class_latents
from tasks.train.encodings import TrainingEncodings, encode_training_set
from tasks.train.objective import diffusion_loss, sample_noise
from tasks.train.state import loop_state, make_optimizer, restore_loop_state

log = logging.getLogger(__name__)
ADAPTER = "default"
TEXT_ENCODER_STATE_KEYS = ("text_encoder_lora", "text_encoder_2_lora")  # training state keys, per text encoder
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainingHistory:
    """What the loop measured, one entry per optimizer step it took (a resumed run: the new steps only)."""

    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float | None] = field(default_factory=list)  # total LoRA gradient norm before clipping
    prior_losses: list[float | None] = field(default_factory=list)  # the class images' loss; None without them
    trainable_params: int = 0


@dataclass
class TrainState:
    """Everything a step needs, built once by `setup`."""

    run: TrainingRunSpec
    pipe: object
    items: list[DatasetItem]
    device: str
    encoded: TrainingEncodings
    sizes: list[tuple[int, int]]
    generator: torch.Generator
    noise_scheduler: DDPMScheduler
    trained_encoders: list
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: object
    scaler: torch.amp.GradScaler
    autocast: AbstractContextManager
    first_step: int
    encode_text: bool  # the text encoder runs every step (it trains, or captions change per step)
    prior: PriorSet | None = None  # prior preservation's class images (training.prior_preservation)


@dataclass
class PriorSet:
    """Prior preservation's class images, encoded as the training set is, their caption and their loss weight."""

    caption: str
    encoded: TrainingEncodings
    weight: float


@dataclass
class Draw:
    """One step's examples from one image set: which ones, their captions, clean latents, noise and timesteps."""

    encoded: TrainingEncodings
    index: torch.Tensor
    captions: list[str]
    clean: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


CheckpointCallback = Callable[[int, dict, TrainingHistory], None]


def setup(pipe, run: TrainingRunSpec, items: list[DatasetItem], *, device: str, resume: dict | None = None,
          class_items: list[DatasetItem] | None = None) -> TrainState:
    """Freeze the model, encode the training set (and prior preservation's `class_items`), add the LoRA
    adapters and build the optimizer.

    With `resume` (a saved training state) the adapters, optimizer, schedule and RNG continue after
    that step, so the run ends with exactly the weights an uninterrupted run would have.
    """
    encoders, tokenizers = text_encoders(pipe)
    torch.manual_seed(run.seed)
    unet, vae = pipe.unet, pipe.vae
    trained_encoders = encoders if run.train_text_encoder else []
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, *encoders):
        module.requires_grad_(False)

    # The VAE is frozen, so each image is encoded once (cache "off": every step); so is each caption
    # unless the text encoder trains. With buckets each image keeps its own crop size.
    generator = torch.Generator(device="cpu").manual_seed(run.seed)
    sizes = crop_sizes(items, run.resolution, run.bucket_step if run.buckets else None)
    encoded = encode_training_set(items, sizes, vae, encoders, tokenizers, generator, device, mode=run.cache,
                                  cache_dir=run.cache_dir, clip_skip=run.clip_skip)
    prior = encode_prior(run, class_items, vae, encoders, tokenizers, device) if class_items else None

    # Mixed precision: frozen weights are held in the half dtype (half the memory); the LoRA weights
    # and their optimizer state stay fp32, and autocast runs the forward passes in the half dtype.
    half = HALF_DTYPES.get(run.mixed_precision)
    if half is not None:
        for module in (unet, *encoders):
            module.to(half)
    params = add_adapters(unet, trained_encoders, run)
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    optimizer = make_optimizer(run.optimizer, param_groups(unet, trained_encoders, run))
    lr_schedule = get_scheduler(run.lr_scheduler, optimizer, num_warmup_steps=run.lr_warmup_steps,
                                num_training_steps=run.max_steps, num_cycles=run.lr_cycles)
    # fp16 gradients underflow without loss scaling; disabled (a no-op) for fp32 and bf16.
    scaler = torch.amp.GradScaler("cuda" if device == "cuda" else "cpu", enabled=run.mixed_precision == "fp16")
    first_step = 1
    if resume:
        set_peft_model_state_dict(unet, resume["lora"], adapter_name=ADAPTER)
        for key, encoder in zip(TEXT_ENCODER_STATE_KEYS, trained_encoders):
            set_peft_model_state_dict(encoder, resume[key], adapter_name=ADAPTER)
        restore_loop_state(resume, optimizer, lr_schedule, scaler, generator)
        first_step = resume["step"] + 1
    for module in (unet, *trained_encoders):
        module.train()
    per_step_captions = run.dataset.caption_dropout > 0 or run.dataset.shuffle_tags
    return TrainState(
        run=run, pipe=pipe, items=items, device=device, encoded=encoded, sizes=sizes, generator=generator,
        noise_scheduler=noise_scheduler, trained_encoders=trained_encoders, params=params, optimizer=optimizer,
        lr_schedule=lr_schedule, scaler=scaler, first_step=first_step,
        autocast=torch.autocast("cuda" if device == "cuda" else "cpu", dtype=half, enabled=half is not None),
        encode_text=per_step_captions or run.train_text_encoder or encoded.text_every_step, prior=prior,
    )


def encode_prior(run: TrainingRunSpec, class_items: list[DatasetItem], vae, encoders: list, tokenizers: list,
                 device: str) -> PriorSet:
    """The class images encoded like the training set (same cache mode and folder). With `train_on = "latents"`
    (the default) their latents are those the sampler produced, the model's own samples; with "images" the
    VAE's re-encoding of their PNGs, drawn from a generator of their own (seed + 1). Either way the training
    set's encodings and a step's first draws are those of the same run without prior preservation; the class
    batches are then drawn after the instance batches from the run's generator."""
    prior = run.prior_preservation
    sizes = crop_sizes(class_items, run.resolution, run.bucket_step if run.buckets else None)
    own = torch.Generator(device="cpu").manual_seed(run.seed + 1)
    encoded = encode_training_set(class_items, sizes, vae, encoders, tokenizers, own, device, mode=run.cache,
                                  cache_dir=run.cache_dir, clip_skip=run.clip_skip)
    if prior.train_on == "latents":  # the text conditioning above is kept; the pixels' encodings are not used
        encoded = replace(encoded, latents=class_latents(class_items), pixels=None)
    return PriorSet(prior.class_prompt, encoded, prior.prior_loss_weight)


def add_adapters(unet, trained_encoders: list, run: TrainingRunSpec) -> list[torch.nn.Parameter]:
    """The run's adapter (LoRA, DoRA, LoHa or LoKr) on the UNet's target modules (and the text encoders'
    attention); returns the fp32 trainables."""
    with MODEL_BUILD_LOCK:  # the adapter type's peft config (tasks.lora.networks): LoRA, DoRA, LoHa or LoKr
        convs = spatial_convs(unet, run.target_modules)  # LoCon's k x k convolutions (training.conv_rank/conv_alpha)
        unet.add_adapter(adapter_config(run, run.target_modules, convs), adapter_name=ADAPTER)
        for encoder in trained_encoders:  # peft directly: transformers' add_adapter wants a newer peft
            inject_adapter_in_model(adapter_config(run, TEXT_ENCODER_TARGETS), encoder, adapter_name=ADAPTER)
    params = [p for module in (unet, *trained_encoders) for p in module.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    return params


def param_groups(unet, trained_encoders: list, run: TrainingRunSpec) -> list[dict]:
    """The UNet's LoRA at `learning_rate`, the text encoders' (when they train) at `text_encoder_lr`."""
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": run.learning_rate}]
    text_params = [p for encoder in trained_encoders for p in encoder.parameters() if p.requires_grad]
    if text_params:
        groups.append({"params": text_params, "lr": run.text_encoder_lr})
    return groups


def train_step(state: TrainState, step: int) -> tuple[float, float, float | None]:
    """One optimizer step over `batch_size x gradient_accumulation_steps` examples; returns its loss, the LoRA
    gradients' total norm before clipping (`max_grad_norm`) and, with prior preservation, the class images'
    loss (the step then also trains on as many class images; the loss it minimises is loss +
    prior_loss_weight x class loss, as diffusers' DreamBooth script)."""
    run = state.run
    micro, accumulation = run.batch_size, run.gradient_accumulation_steps
    batch = micro * accumulation
    # Everything random in a step is drawn first, for the whole accumulated batch, so batch 2 x
    # 2 accumulation steps sees exactly the examples, noise and timesteps of batch 4.
    repeats = torch.tensor([item.repeats for item in state.items], dtype=torch.float)
    index = draw_examples(repeats, state.sizes, batch, state.generator)
    draws = [draw_batch(state, state.encoded, index, step_captions(state, index.tolist(), step))]
    if state.prior is not None:  # the class images' batch, drawn after the instance batch
        class_index = torch.randint(0, len(state.prior.encoded.sizes), (batch,), generator=state.generator)
        draws.append(draw_batch(state, state.prior.encoded, class_index, [state.prior.caption] * batch))

    state.optimizer.zero_grad(set_to_none=True)
    step_losses = [0.0] * len(draws)
    for part in range(accumulation):
        rows = slice(part * micro, (part + 1) * micro)
        for i, drawn in enumerate(draws):
            loss = micro_batch_loss(state, drawn, rows, step)
            # Gradients of the mean over the whole batch; the class images' weighted by prior_loss_weight.
            scaled = loss / accumulation if i == 0 else loss * (state.prior.weight / accumulation)
            state.scaler.scale(scaled).backward()
            step_losses[i] += loss.item() / accumulation
    state.scaler.unscale_(state.optimizer)  # fp16: measure and clip the true gradients (a no-op otherwise)
    grad_norm = clip_gradients(state.params, run.max_grad_norm)
    state.scaler.step(state.optimizer)  # with fp16: skipped when gradients overflowed, and the scale lowered
    state.scaler.update()
    return float(step_losses[0]), grad_norm, float(step_losses[1]) if len(step_losses) > 1 else None


def draw_batch(state: TrainState, encoded: TrainingEncodings, index: torch.Tensor, captions: list[str]) -> Draw:
    """The examples' clean latents (cache off: a fresh posterior sample), then their noise and timesteps."""
    clean = encoded.latents_for(index.tolist(), state.pipe.vae, state.generator, state.device)
    noise = sample_noise(clean.shape, state.generator, state.run.noise_offset)
    steps = state.noise_scheduler.config.num_train_timesteps
    return Draw(encoded, index, captions, clean, noise, torch.randint(0, steps, (len(index),), generator=state.generator))


def micro_batch_loss(state: TrainState, drawn: Draw, rows: slice, step: int) -> torch.Tensor:
    """The diffusion loss of one micro-batch (`rows` of the step's draw), with gradients."""
    run, scheduler = state.run, state.noise_scheduler
    t, clean, noise = (x[rows].to(state.device) for x in (drawn.timesteps, drawn.clean, drawn.noise))
    noisy = scheduler.add_noise(clean, noise, t)
    target = scheduler.get_velocity(clean, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    with state.autocast:
        condition = drawn.encoded.text.select(drawn.index[rows])
        if state.encode_text:
            encoders, tokenizers = text_encoders(state.pipe)
            condition = condition.with_text(*encode_captions(drawn.captions[rows], encoders, tokenizers, state.device,
                                                             grad=run.train_text_encoder, clip_skip=run.clip_skip))
        prediction = state.pipe.unet(noisy, t, **condition.unet_kwargs(state.device)).sample
    loss = diffusion_loss(prediction, target, t, scheduler, run.min_snr_gamma)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower training.learning_rate")
    return loss


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The parameters' total gradient norm; with `max_norm`, the gradients scaled down to at most that norm.
    Without it the gradients are left untouched (bit for bit)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm is None:
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def step_captions(state: TrainState, index: list[int], step: int) -> list[str]:
    """The step's captions; with caption dropout or tag shuffling, changed per step by a step-seeded RNG
    (so a resumed run sees the same text)."""
    ds = state.run.dataset
    captions = [state.items[i].caption for i in index]
    if ds.caption_dropout > 0 or ds.shuffle_tags:
        rng = np.random.default_rng([state.run.seed, step])
        captions = [training_caption(c, rng, dropout=ds.caption_dropout, shuffle=ds.shuffle_tags,
                                     keep_tokens=ds.keep_tokens) for c in captions]
    return captions


def train_loop(state: TrainState, on_checkpoint: CheckpointCallback | None = None) -> TrainingHistory:
    """Steps from `state.first_step` to `max_steps` (or the run's `stop_at` checkpoint step); `on_checkpoint(step,
    loop_state, history)` at every checkpoint step. Returns the losses, learning rates and gradient norms of the
    steps taken."""
    run = state.run
    history = TrainingHistory(trainable_params=sum(p.numel() for p in state.params))
    last = run.max_steps if run.stop_at is None else run.stop_at
    progress = tqdm(range(state.first_step, last + 1), desc=f"train {run.run_id}", leave=False)
    for step in progress:
        loss, grad_norm, prior_loss = train_step(state, step)
        history.grad_norms.append(grad_norm)
        history.prior_losses.append(prior_loss)
        history.learning_rates.append(state.optimizer.param_groups[0]["lr"])
        state.lr_schedule.step()
        history.losses.append(loss)
        progress.set_postfix(loss=f"{loss:.4f}")
        if step in run.checkpoint_steps:
            if on_checkpoint is not None:
                on_checkpoint(step, loop_state(state.optimizer, state.lr_schedule, state.scaler, state.generator),
                              history)
            log.info("run %s: checkpoint at step %d (loss %.4f)", run.run_id, step, loss)
    state.pipe.unet.eval()
    for encoder in state.trained_encoders:
        encoder.eval()
    if run.gradient_checkpointing:
        state.pipe.unet.disable_gradient_checkpointing()
    return history


def fit_lora(pipe, run: TrainingRunSpec, items: list[DatasetItem], *, device: str,
             on_checkpoint: CheckpointCallback | None = None, resume: dict | None = None,
             class_items: list[DatasetItem] | None = None) -> TrainingHistory:
    """Add LoRA adapters to `pipe` and train them in place: `setup` then `train_loop`."""
    return train_loop(setup(pipe, run, items, device=device, resume=resume, class_items=class_items), on_checkpoint)


def draw_examples(repeats: torch.Tensor, sizes: list[tuple[int, int]], batch: int,
                  generator: torch.Generator) -> torch.Tensor:
    """One step's example indices, each drawn with weight `repeats` (kohya repeat folders).

    With one crop size, `batch` independent draws (all-1 repeats: the plain uniform draw). With
    aspect-ratio buckets the first example picks the bucket and the rest come from that bucket, so
    a batch stacks; each example's chance stays proportional to its repeats.
    """
    if len(set(sizes)) == 1:
        if bool((repeats != 1).any()):
            return torch.multinomial(repeats, batch, replacement=True, generator=generator)
        return torch.randint(0, len(sizes), (batch,), generator=generator)
    first = torch.multinomial(repeats, 1, generator=generator)
    same = torch.tensor([i for i, size in enumerate(sizes) if size == sizes[int(first)]])
    if batch == 1:
        return first
    rest = same[torch.multinomial(repeats[same], batch - 1, replacement=True, generator=generator)]
    return torch.cat([first, rest])
