"""CLIP metrics per rendered image: prompt adherence and closeness to the training images.

`clip_text_image_score` is the usual CLIP score, 100 * max(cos(image, prompt), 0) (Hessel et
al. 2021, as torchmetrics computes it); prompts longer than CLIP's 77 tokens are truncated.
`clip_similarity_to_training` is the highest cosine similarity of the image to any training
image (reference_id names it): near 1 suggests the LoRA copies a training image.

Nothing is downloaded: point `ClipScorer.from_pretrained` at a local folder that holds a CLIP
model saved by transformers, safetensors only, for example a local copy of
openai/clip-vit-large-patch14 (`hf download openai/clip-vit-large-patch14 --local-dir
/models/clip-vit-large-patch14 --include "*.json" "*.txt" model.safetensors` on a machine with
network access), then `ClipScorer.from_pretrained("/models/clip-vit-large-patch14")`. The folder
needs config.json, model.safetensors, preprocessor_config.json and the tokenizer files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from tasks.score.image_features import as_rgb_uint8, training_id_problems
from tasks.score.metrics import METRICS, MetricValue
from tasks.sweep.devices import torch_device

TEXT_IMAGE_METRIC = "clip_text_image_score"  # higher is better: the image shows its prompt
TRAINING_METRIC = "clip_similarity_to_training"  # lower is better: high suggests copying
assert not {TEXT_IMAGE_METRIC, TRAINING_METRIC} & set(METRICS), "CLIP metric names must be unique"
BATCH_SIZE = 32  # images (and prompts) per forward pass
EXPECTED = ("a local CLIP folder saved by transformers (config.json with model_type 'clip', "
            "model.safetensors, preprocessor_config.json, tokenizer.json or vocab.json + merges.txt), "
            "e.g. a local copy of openai/clip-vit-large-patch14")


def clip_folder_problems(folder: Path) -> list[str]:
    """Every problem with a CLIP model folder, found without loading weights."""
    if not folder.is_dir():
        return [f"CLIP model {folder}: {'is not a folder' if folder.exists() else 'does not exist'}; "
                f"expected {EXPECTED}"]
    problems = []
    config = folder / "config.json"
    if not config.is_file():
        problems.append(f"CLIP model {folder}: no config.json")
    elif (model_type := _model_type(config)) != "clip":
        problems.append(f"CLIP model {folder}: config.json model_type is {model_type!r}, expected 'clip'")
    if not any(folder.glob("model*.safetensors")):
        problems.append(f"CLIP model {folder}: no model.safetensors (safetensors only; pickled .bin is refused)")
    if not (folder / "preprocessor_config.json").is_file():
        problems.append(f"CLIP model {folder}: no preprocessor_config.json (the image processor)")
    if not ((folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
        problems.append(f"CLIP model {folder}: no tokenizer.json or vocab.json + merges.txt")
    return [p + f"; expected {EXPECTED}" for p in problems]


def _model_type(config: Path) -> object:
    """The model_type in a config.json, or a description of why it cannot be read."""
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        return f"unreadable ({error})"


@dataclass(frozen=True)
class TrainingClipEmbeddings:
    """Unit-norm CLIP image embeddings of the training set (N x D), computed once per sweep."""

    ids: tuple[str, ...]
    embeddings: np.ndarray  # float64, N x D, each row unit length
    model_path: str  # embeddings from another model are not comparable


class ClipScorer:
    """A CLIP model, its tokenizer and image processor, loaded offline from one local folder."""

    def __init__(self, model: CLIPModel, tokenizer: CLIPTokenizer, processor: CLIPImageProcessor,
                 path: str, device: torch.device) -> None:
        self.model, self.tokenizer, self.processor = model.eval().to(device), tokenizer, processor
        self.path, self.device = path, device

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None) -> ClipScorer:
        """Load from a local folder (CUDA when present); raise ValueError listing every problem."""
        folder = Path(path)
        problems = clip_folder_problems(folder)
        if problems:
            raise ValueError("invalid CLIP model:\n" + "\n".join(f"- {p}" for p in problems))
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
        chosen = torch.device(device or torch_device())
        return cls(model, tokenizer, processor, str(folder), chosen)

    @torch.no_grad()
    def embed_images(self, images: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
        """Unit-norm image embeddings (N x D, float64), in batches of BATCH_SIZE."""
        checked = _checked_images(images, names)
        out = []
        for start in range(0, len(checked), BATCH_SIZE):
            pil = [Image.fromarray(a) for a in checked[start:start + BATCH_SIZE]]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled))
        return _unit_rows(torch.cat(out))

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings (N x D, float64), truncated to CLIP's context length."""
        out = []
        for start in range(0, len(prompts), BATCH_SIZE):
            tokens = self.tokenizer(list(prompts[start:start + BATCH_SIZE]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled))
        return _unit_rows(torch.cat(out))

    def embed_training(self, ids: Sequence[str], images: Sequence[np.ndarray]) -> TrainingClipEmbeddings:
        """Embed the training set once per sweep; ids and images are checked (every problem at once)."""
        problems = training_id_problems(ids, images)
        if problems:
            raise ValueError("training set: " + "; ".join(problems))
        names = [f"training image {i!r}" for i in ids]
        return TrainingClipEmbeddings(tuple(ids), self.embed_images(images, names), self.path)

    def score(self, images: list[np.ndarray], prompts: list[str],
              training: TrainingClipEmbeddings | None) -> list[list[MetricValue]]:
        """Per image: the CLIP score against its prompt, and (with `training`) the nearest training image."""
        _check_score_inputs(images, prompts, training, self.path)
        if not images:
            return []
        image_emb = self.embed_images(images, [f"images[{i}]" for i in range(len(images))])
        text_emb = self.embed_texts(prompts)
        clip_scores = 100.0 * np.maximum(np.sum(image_emb * text_emb, axis=1), 0.0)
        rows = [[MetricValue(TEXT_IMAGE_METRIC, float(s), True, None)] for s in clip_scores]
        if training is not None:
            similarities = image_emb @ training.embeddings.T
            for row, sims in zip(rows, similarities):
                best = int(np.argmax(sims))
                row.append(MetricValue(TRAINING_METRIC, float(sims[best]), False, training.ids[best]))
        return rows


def _unit_rows(embeddings: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, in float64 so identical inputs give a cosine of 1 to ~1e-12."""
    array = embeddings.detach().cpu().to(torch.float64).numpy()
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def _checked_images(images: Sequence[np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
    """Every image as uint8 RGB; one ValueError naming each bad image."""
    checked, problems = [], []
    for image, name in zip(images, names):
        try:
            checked.append(as_rgb_uint8(image, name))
        except (TypeError, ValueError) as error:
            problems.append(str(error))
    if problems:
        raise ValueError("; ".join(problems))
    return checked


def _check_score_inputs(images: Sequence[np.ndarray], prompts: Sequence[str],
                        training: TrainingClipEmbeddings | None, path: str) -> None:
    """Raise one ValueError listing every problem with score()'s arguments."""
    problems = []
    if len(images) != len(prompts):
        problems.append(f"got {len(images)} images but {len(prompts)} prompts")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        problems.append(f"prompts at {bad} are not strings")
    if training is not None and training.model_path != path:
        problems.append(f"training embeddings come from {training.model_path}, not {path}; "
                        "embed the training set with this scorer")
    if problems:
        raise ValueError("CLIP score: " + "; ".join(problems))
