"""Committed assets: the real CLIP BPE tokenizer and the pretrained tiny world model (weights, configs)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
CLIP_TOKENIZER_DIR = ASSETS_DIR / "clip_tokenizer"
WORLD_MODEL_DIR = ASSETS_DIR / "tiny-sd15-world"
