"""What the frozen VAE and text encoders make of the training set: computed once, or every step.

`training.cache` picks where the encodings live:
  "disk"    each image's VAE posterior and each caption's text-encoder output is saved under
            `cache_dir`, keyed by a content hash of the encoder's weights and the image bytes (and
            crop size) or the caption's token ids; later runs, sweeps and resumes reuse it.
  "memory"  encoded once per run and held in memory.
  "off"     the VAE and text encoders run on every step's batch, as the diffusers example does.
Every image and caption is encoded alone, so an encoding never depends on its batch-mates and a
warm disk cache trains bit for bit like a cold one or like "memory". The cache holds the VAE's
posterior (mean and log-variance), not a sample: the latent is still drawn from it with the run's
seeded generator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from storage.atomic import write_atomic
from tasks.data.dataset import DatasetItem, item_size, load_training_image
from tasks.models.text_conditioning import TextConditioning, caption_tokens, encode_captions, size_ids
from tasks.sweep.ids import content_id

log = logging.getLogger(__name__)
# Bump when load_training_image or the encoders' inputs change: old cache entries then stop matching.
PREPROCESS_VERSION = 1
SAMPLE_CHUNK = 8  # posterior samples are drawn 8 images at a time, in dataset order


@dataclass
class CacheStats:
    """How many encodings came from the disk cache and how many were computed."""

    hits: int = 0
    misses: int = 0


class EncodingCache:
    """Safetensors files under `folder/<kind>/<key[:2]>/<key>.safetensors`, written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.stats = CacheStats()

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / key[:2] / f"{key}.safetensors"

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        file = self.path(kind, key)
        if not file.is_file():
            self.stats.misses += 1
            return None
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as err:  # a damaged entry is recomputed, not trusted
            log.warning("encoding cache: %s is unreadable (%s); encoding again", file, err)
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return tensors

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], about: dict[str, object]) -> None:
        file = self.path(kind, key)
        file.parent.mkdir(parents=True, exist_ok=True)
        # Concurrent writers of one key write the same bytes; the last rename wins.
        write_atomic(file, save({k: v.contiguous() for k, v in tensors.items()},
                                metadata={k: json.dumps(v) for k, v in about.items()}))


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of the modules, in order."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself: no copy
    return digest.hexdigest()


@dataclass
class TrainingEncodings:
    """Per training example: its crop size, latent (or, cache off, pixels) and text conditioning.

    With the cache on, `latents[i]` is a posterior sample drawn once per run; with it off,
    `latents_for` encodes the step's images anew and draws their samples then.
    """

    sizes: list[tuple[int, int]]  # (width, height) each image was cropped to
    text: TextConditioning  # states and pooled are None when the cache is off (encoded every step)
    latents: list[torch.Tensor] | None = None
    pixels: list[torch.Tensor] | None = None
    cache_stats: CacheStats | None = None  # with the disk cache: entries reused and computed

    @property
    def text_every_step(self) -> bool:
        return self.text.states is None

    def latents_for(self, index: list[int], vae, generator: torch.Generator, device: str) -> torch.Tensor:
        """The scaled latents of the examples `index` (all of one size), on the CPU."""
        if self.latents is not None:
            return torch.stack([self.latents[i] for i in index])
        pixels = torch.stack([self.pixels[i] for i in index])
        with torch.no_grad():
            params = vae.encode(pixels.to(device, vae.dtype)).latent_dist.parameters.float().cpu()
        return DiagonalGaussianDistribution(params).sample(generator=generator) * vae.config.scaling_factor


def encode_training_set(items: list[DatasetItem], sizes: list[tuple[int, int]], vae, encoders: list,
                        tokenizers: list, generator: torch.Generator, device: str, *, mode: str,
                        cache_dir: str | None = None, clip_skip: int = 1) -> TrainingEncodings:
    """Encode (or load from the cache) every item at its crop size; see the module docstring for `mode`."""
    time_ids = (torch.tensor([size_ids(item_size(item), max(size), size) for item, size in zip(items, sizes, strict=True)])
                if len(encoders) == 2 else None)
    if mode == "off":
        pixels = [_pixels(item, size) for item, size in zip(items, sizes, strict=True)]
        return TrainingEncodings(sizes, TextConditioning(None, None, time_ids), pixels=pixels)
    cache = EncodingCache(Path(cache_dir)) if mode == "disk" and cache_dir else None
    posteriors = _posteriors(items, sizes, vae, device, cache)
    states, pooled = _text_outputs([item.caption for item in items], encoders, tokenizers, device, cache, clip_skip)
    if cache is not None:
        log.info("encoding cache %s: %d hits, %d encoded", cache.folder, cache.stats.hits, cache.stats.misses)
    latents = [latent * vae.config.scaling_factor for latent in _sample_in_order(posteriors, generator)]
    return TrainingEncodings(sizes, TextConditioning(states, pooled, time_ids), latents=latents,
                             cache_stats=cache.stats if cache is not None else None)


def _pixels(item: DatasetItem, size: tuple[int, int]) -> torch.Tensor:
    """The image as training sees it (tasks.data.dataset.load_training_image): 3 x h x w in [-1, 1]."""
    return torch.from_numpy(load_training_image(item.path, max(size), size=size).transpose(2, 0, 1))


def _posteriors(items: list[DatasetItem], sizes: list[tuple[int, int]], vae, device: str,
                cache: EncodingCache | None) -> list[torch.Tensor]:
    """Each image's VAE posterior parameters (mean and log-variance, fp32, on the CPU); an image is
    only decoded from its file when its posterior is not in the cache."""
    vae_id = weights_fingerprint(vae) if cache is not None else ""
    out = []
    for item, size in zip(items, sizes, strict=True):
        key = content_id({"vae": vae_id, "image": item.image_id, "size": size, "version": PREPROCESS_VERSION}, 64)
        cached = cache.load("vae", key) if cache is not None else None
        if cached is None:
            with torch.no_grad():
                image = _pixels(item, size)[None].to(device, vae.dtype)
                params = vae.encode(image).latent_dist.parameters.float().cpu()[0]
            if cache is not None:
                cache.save("vae", key, {"posterior": params}, {"image": str(item.path), "size": list(size)})
            cached = {"posterior": params}
        out.append(cached["posterior"])
    return out


def _text_outputs(captions: list[str], encoders: list, tokenizers: list, device: str,
                  cache: EncodingCache | None, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (and SDXL's pooled embedding) of each caption, stacked, on the CPU. The cache key holds
    clip_skip only when it is not 1, so entries written before the option existed stay valid."""
    encoders_id = weights_fingerprint(*encoders) if cache is not None else ""
    states, pooled = [], []
    for caption in captions:
        tokens = [ids.tolist() for ids in caption_tokens(caption, tokenizers)]
        identity = {"encoders": encoders_id, "tokens": tokens, **({"clip_skip": clip_skip} if clip_skip != 1 else {})}
        key = content_id(identity, 64)
        cached = cache.load("text", key) if cache is not None else None
        if cached is None:
            hidden, pool = encode_captions([caption], encoders, tokenizers, device, clip_skip=clip_skip)
            cached = {"states": hidden[0].float().cpu()}
            if pool is not None:
                cached["pooled"] = pool[0].float().cpu()
            if cache is not None:
                cache.save("text", key, cached, {"caption": caption})
        states.append(cached["states"])
        if "pooled" in cached:
            pooled.append(cached["pooled"])
    return torch.stack(states), torch.stack(pooled) if pooled else None


def _sample_in_order(posteriors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One latent per posterior, drawn SAMPLE_CHUNK same-size images at a time in dataset order."""
    samples: list[torch.Tensor] = []
    start = 0
    while start < len(posteriors):
        shape = posteriors[start].shape
        end = start + 1
        while end < len(posteriors) and end - start < SAMPLE_CHUNK and posteriors[end].shape == shape:
            end += 1
        chunk = DiagonalGaussianDistribution(torch.stack(posteriors[start:end])).sample(generator=generator)
        samples.extend(chunk)
        start = end
    return samples
