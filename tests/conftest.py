"""Shared fixtures: the embedded tiny Stable Diffusion model, built once per test session."""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# One torch thread everywhere (here, training children, Dask workers): the same float reductions in
# every process, so runners compare pixel for pixel, and no oversubscription when the flow's two
# task threads run on a 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers folder holding the seeded tiny SD1.5-architecture model."""
    from tasks.models.tiny_sd15 import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect server for the whole session (starting one costs ~12 s)."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # a killed pytest must not leave the harness server running
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture()
def tiny_pipeline(tiny_model_dir: Path):
    """A fresh pipeline loaded through the same code path as real weights."""
    from tasks.models.base_model import load_pipeline

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


def write_spec(tmp_path: Path, data: dict) -> Path:
    lines = []

    def emit(prefix: str, table: dict) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and not _is_table_list(v)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in scalars.items())
        for k, v in table.items():
            if isinstance(v, dict):
                emit(f"{prefix}.{k}" if prefix else k, v)
            elif _is_table_list(v):
                for item in v:
                    lines.append(f"[[{prefix}.{k}]]" if prefix else f"[[{k}]]")
                    lines.extend(f"{ik} = {_toml(iv)}" for ik, iv in item.items())

    emit("", data)
    path = tmp_path / "sweep.toml"
    path.write_text("\n".join(lines) + "\n")
    assert tomllib.loads(path.read_text()) == data
    return path


def _is_table_list(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)


def _toml(v: object) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(i) for i in v) + "]"
    return repr(v)
