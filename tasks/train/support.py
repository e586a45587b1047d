"""What a run asks of this machine, checked before any model is loaded, and the memory preset's log line."""

from __future__ import annotations

import logging
from importlib.util import find_spec

from tasks.sweep.plan import TrainingRunSpec

log = logging.getLogger(__name__)


def check_training_support(run: TrainingRunSpec, device: str) -> None:
    """Options this machine cannot run, reported before any model is loaded or step taken."""
    problems = []
    if run.mixed_precision == "fp16" and device != "cuda":
        problems.append("training.mixed_precision = 'fp16' needs a CUDA GPU and this machine trains on the CPU; "
                        "allowed here: 'bf16' or 'no'")
    if run.optimizer == "adamw8bit":
        missing = [what for what, absent in (("a CUDA GPU", device != "cuda"),
                                             ("the bitsandbytes package", find_spec("bitsandbytes") is None)) if absent]
        if missing:
            problems.append(f"training.optimizer = 'adamw8bit' needs {' and '.join(missing)}, which this machine "
                            "lacks; allowed here: 'adamw'")
    if problems:
        raise ValueError(f"run {run.run_id} cannot train here: " + "; ".join(problems))


def log_memory_preset(run: TrainingRunSpec) -> None:
    """Log the memory preset's choice, and which of its values the spec's own keys replaced."""
    preset = run.memory_preset
    if preset is None:
        return
    log.info("run %s: memory preset: %s", run.run_id, preset.explanation)
    chosen = {"resolution": preset.resolution, "batch_size": preset.batch_size, "rank": preset.rank,
              "gradient_checkpointing": preset.gradient_checkpointing, "mixed_precision": preset.mixed_precision}
    overridden = {k: getattr(run, k) for k, v in chosen.items() if getattr(run, k) != v}
    if overridden:
        log.info("run %s: the spec's own values win over the preset: %s", run.run_id, overridden)
