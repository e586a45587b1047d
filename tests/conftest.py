"""Shared fixtures: the embedded tiny Stable Diffusion model, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder holding the seeded tiny SD1.5-architecture model."""
    from tasks.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture()
def tiny_pipeline(tiny_model_dir: Path):
    """A fresh pipeline loaded through the same code path as real weights."""
    from tasks.base_model import load_pipeline

    return load_pipeline(str(tiny_model_dir))


def small_sweep_data(output_dir: Path, **training: object) -> dict:
    """A small but complete sweep spec (as parsed TOML) on the builtin tiny model and demo world."""
    data = {
        "name": "small",
        "output_dir": str(output_dir),
        "dataset": {"path": "builtin:demo-world", "trigger_word": "zqx"},
        "base_models": [{"name": "tiny-sd15", "path": "builtin:tiny-sd15"}],
        "training": {"ranks": [2, 4], "alpha": 3.0, "max_steps": 12, "checkpoint_steps": [6, 12],
                     "learning_rate": 1e-3, "batch_size": 2, "resolution": 64, "seed": 0},
        "render": {"prompts": ["a photo of {trigger}"], "seeds": [1, 2], "samplers": ["Euler a", "DPM++ 2M Karras"],
                   "steps": [2, 3], "lora_weights": [0.0, 1.0], "cfg_scales": [7.0], "width": 64, "height": 64},
    }
    data["training"].update(training)
    return data
