"""Provenance recorded beside every artifact: package versions, git commit, host, time."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("lora-sweep", "torch", "diffusers", "peft", "transformers", "accelerate", "prefect", "duckdb", "pyarrow")


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The commit of this checkout, with '-dirty' when it has uncommitted changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if sha.returncode != 0:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance() -> dict[str, object]:
    return {
        "versions": package_versions(),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "host": platform.node(),
        "platform": platform.platform(),
        "recorded_at": datetime.now(timezone.utc).isoformat(),
    }


@lru_cache(maxsize=1)
def lora_sweep_version() -> str:  # read once: 1 ms a call, and every image's infotext asks
    try:
        return metadata.version("lora-sweep")
    except metadata.PackageNotFoundError:
        return "dev"
