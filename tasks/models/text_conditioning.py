"""What the UNet is conditioned on besides the noisy latents, for each model family.

SD1.x: the text encoder's last hidden states. SDXL: both text encoders' penultimate hidden
states, concatenated, plus `added_cond_kwargs`: the second encoder's pooled (projected) embedding
and six size ids (original height and width, crop top and left, target height and width), built
as diffusers' StableDiffusionXLPipeline builds them at render time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextConditioning:
    """Per example: text hidden states and, for SDXL, the pooled text embedding and size ids."""

    states: torch.Tensor | None  # None until encoded (training with the encoding cache off)
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> TextConditioning:
        return TextConditioning(*(None if x is None else x[index] for x in (self.states, self.pooled, self.time_ids)))

    def with_text(self, states: torch.Tensor, pooled: torch.Tensor | None) -> TextConditioning:
        """The same examples with freshly encoded text (caption dropout, tag shuffle, text-encoder LoRA)."""
        return TextConditioning(states, pooled, self.time_ids)

    def unet_kwargs(self, device: str) -> dict[str, object]:
        added = None
        if self.pooled is not None:
            added = {"text_embeds": self.pooled.to(device), "time_ids": self.time_ids.to(device)}
        return {"encoder_hidden_states": self.states.to(device), "added_cond_kwargs": added}


def text_encoders(pipe) -> tuple[list, list]:
    """The pipeline's text encoders and their tokenizers: one for SD1.x, two for SDXL."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    return [pipe.text_encoder], [pipe.tokenizer]


def encode_captions(captions: list[str], encoders: list, tokenizers: list, device: str,
                    grad: bool = False, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled or None) for a list of captions (truncated at the tokenizer's 77 tokens);
    `grad` when the text encoder's LoRA trains; `clip_skip` (SD1.x) as A1111 (clip_skip_states)."""
    with torch.set_grad_enabled(grad):
        if len(encoders) == 1:
            return clip_skip_states(encoders[0], _tokens(captions, tokenizers[0]).to(device), clip_skip), None
        states = []
        for encoder, tokenizer in zip(encoders, tokenizers, strict=True):
            output = encoder(_tokens(captions, tokenizer).to(device), output_hidden_states=True)
            states.append(output.hidden_states[-2])
        return torch.cat(states, dim=-1), output[0]  # the last (projection) encoder's pooled embedding


def clip_skip_states(encoder, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """An SD1.x text encoder's conditioning as A1111's "Clip skip" N makes it: the N-th hidden state from the
    end passed through the final layer norm (N = 1: the plain last hidden state)."""
    if clip_skip == 1:
        return encoder(tokens)[0]
    layers = encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ValueError(f"clip_skip {clip_skip} exceeds this text encoder's {layers} layers; "
                         f"allowed: 1 to {layers}")
    hidden = encoder(tokens, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers 5 keeps the layer norm on the model itself; 4.x under `text_model` (which diffusers' own
    # clip_skip still assumes, so its clip_skip fails with transformers 5).
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


def caption_tokens(caption: str, tokenizers: list) -> list[torch.Tensor]:
    """The token ids each tokenizer gives one caption (padded to 77): all its encoders see."""
    return [_tokens([caption], tokenizer)[0] for tokenizer in tokenizers]


def _tokens(captions: list[str], tokenizer) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def size_ids(original: tuple[int, int], resolution: int, size: tuple[int, int] | None = None) -> list[float]:
    """SDXL's six size ids for an image of `original` (w, h) as tasks.data.dataset.load_training_image crops
    it (centre crop to `size` (w, h), default a square of `resolution`, resized): original (h, w), the
    crop's top-left in the resized image, target (h, w)."""
    target_w, target_h = size or (resolution, resolution)
    width, height = original
    scale = max(target_w / width, target_h / height)
    top, left = round((height * scale - target_h) / 2), round((width * scale - target_w) / 2)
    return [float(height), float(width), float(top), float(left), float(target_h), float(target_w)]
