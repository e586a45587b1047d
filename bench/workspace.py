"""A throwaway sweep for the benchmarks: tiny model, demo dataset, one trained LoRA checkpoint.

Built with the production planning code (spec -> inputs -> runs -> render jobs), so the
benchmarks time exactly what a sweep runs.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

from tasks.preflight import prepare_inputs
from tasks.sweep.load import parse_spec
from tasks.sweep.plan import CheckpointRef, PreparedInputs, RenderJobSpec, TrainingRunSpec, render_jobs, training_runs
from tasks.sweep.spec import SweepSpec

TRIGGER = "zqx"


def sweep_data(output_dir: Path, *, rank: int = 4, max_steps: int = 4, batch_size: int = 4,
               steps: int = 20, model: tuple[str, str] = ("tiny-sd15", "builtin:tiny-sd15"), size: int = 64) -> dict:
    """A one-run sweep on the demo world (parsed-TOML form): the builtin tiny model at 64 px unless another
    (name, path) and size are given."""
    return {
        "name": "bench",
        "output_dir": str(output_dir),
        "dataset": {"path": "builtin:demo-world", "trigger_word": TRIGGER},
        "base_models": [{"name": model[0], "path": model[1]}],
        "training": {"ranks": [rank], "alpha": float(rank), "max_steps": max_steps,
                     "checkpoint_steps": [max_steps], "learning_rate": 1e-3, "batch_size": batch_size,
                     "resolution": size, "seed": 0},
        "render": {"prompts": ["a photo of {trigger}", "a photo of {trigger} on a teal background"],
                   "negative_prompt": "blurry", "seeds": [1, 2, 3, 4], "samplers": ["Euler a"],
                   "steps": [steps], "lora_weights": [1.0], "cfg_scales": [7.0], "width": size, "height": size},
    }


@dataclass(frozen=True)
class Workspace:
    """The sweep, its checked inputs and its single training run."""

    root: Path
    spec: SweepSpec
    inputs: PreparedInputs
    run: TrainingRunSpec

    @classmethod
    def create(cls, root: Path, **overrides: object) -> Workspace:
        spec = parse_spec(sweep_data(root, **overrides), "bench workspace")
        with contextlib.redirect_stdout(sys.stderr):  # its dataset summary would land inside the table
            inputs = prepare_inputs(spec)  # builds the tiny model and the demo dataset on first use
        runs = training_runs(spec, inputs.model_paths, inputs.dataset_path, inputs.dataset_fingerprint)
        return cls(root, spec, inputs, runs[0])

    @property
    def model_path(self) -> str:
        return self.run.base_model_path

    def trained_checkpoint(self) -> CheckpointRef:
        """Train the run (in this process, a few steps) and return its checkpoint."""
        from tasks.train.run import train_lora

        return train_lora(self.run).checkpoints[-1]

    def render_job(self, checkpoint: CheckpointRef) -> RenderJobSpec:
        """The render job of `checkpoint` over the spec's grid, as the flow would plan it."""
        jobs = render_jobs(self.spec, self.inputs.model_paths, [checkpoint], [self.run], self.inputs.dataset_path)
        return next(j for j in jobs if j.checkpoint is not None)
