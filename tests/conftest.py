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
