"""`python -m bench.caption_fidelity [--output-dir DIR]`: the caption-as-prompt check on the demo world.

Writes the 12-scene world dataset `sweeps/demo-captions.toml` trains on (each scene with its own caption),
then runs that sweep's stages in this process as the flow runs them (preflight, training, render and score
jobs, catalog) and prints, per checkpoint step and LoRA weight, the mean fidelity of trained and held-out
captions' renders to their own images (the catalog query in the README). Finished work is found again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tomllib
from pathlib import Path

for _name, _value in {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_name, _value)  # before diffusers reads them

from storage.catalog import Manifest, build_catalog, connect
from storage.layout import SweepLayout
from tasks.data.demo_world import write_world_dataset
from tasks.preflight import prepare_inputs
from tasks.render.job import render_job
from tasks.score.job import score_job
from tasks.sweep.load import parse_spec, resolve_paths
from tasks.sweep.plan import planned_runs, render_jobs, sweep_root
from tasks.train.run import train_lora

SPEC = Path(__file__).resolve().parent.parent / "sweeps" / "demo-captions.toml"
DATASET_SEED = 1  # scenes the pretrained world model never saw (it was pretrained on seed 0's)
DATASET_SIZE = 12

# Trained vs held-out caption fidelity per checkpoint step and LoRA weight (weight 0: the baseline, step NULL),
# and the gain over the same caption and seed without the LoRA (the README's cookbook query).
FIDELITY_SQL = """
WITH fidelity AS (
    SELECT i.checkpoint_step, i.lora_weight, i.held_out, i.source_image, i.seed, i.sampler, i.steps,
           i.cfg_scale, i.clip_skip, m.metric, m.value
    FROM images AS i JOIN image_metrics AS m USING (image_id)
    WHERE i.prompt_source = 'caption' AND m.metric IN ('caption_ssim', 'caption_color_chi2')
)
SELECT f.checkpoint_step AS step, f.lora_weight AS weight, f.held_out,
       avg(f.value) FILTER (WHERE f.metric = 'caption_ssim') AS ssim,
       avg(f.value - b.value) FILTER (WHERE f.metric = 'caption_ssim') AS ssim_gain,
       avg(f.value) FILTER (WHERE f.metric = 'caption_color_chi2') AS color_chi2,
       count(*) FILTER (WHERE f.metric = 'caption_ssim') AS images
FROM fidelity AS f
JOIN fidelity AS b USING (source_image, seed, sampler, steps, cfg_scale, clip_skip, metric)
WHERE b.checkpoint_step IS NULL
GROUP BY ALL ORDER BY step NULLS FIRST, weight, held_out
"""


def run_sweep(output_dir: Path | None = None, **training: object) -> list[dict[str, object]]:
    """Run the caption sweep (its output folder and training settings optionally replaced); the fidelity rows."""
    data = tomllib.loads(SPEC.read_text())
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
        data["dataset"]["path"] = str(Path(output_dir) / "demo-world-captions")
    data["training"].update(training)
    spec = resolve_paths(parse_spec(data, str(SPEC)), SPEC.parent)
    write_world_dataset(Path(spec.dataset.path), count=DATASET_SIZE, size=spec.training.resolution, seed=DATASET_SEED)
    with contextlib.redirect_stdout(sys.stderr):  # the dataset summary
        inputs = prepare_inputs(spec)
    runs = planned_runs(spec, inputs)
    checkpoints = [c for run in runs for c in train_lora(run).checkpoints]
    jobs = render_jobs(spec, inputs.model_paths, checkpoints, runs, inputs.dataset_path, inputs.caption_prompts)
    for job in jobs:
        render_job(job)
        score_job(job)
    layout = SweepLayout(sweep_root(spec))
    manifest = Manifest(spec.sweep_id(), tuple(r.run_id for r in runs), tuple(j.render_id for j in jobs))
    manifest.write(layout)
    build_catalog(layout, manifest)
    with connect(layout) as con:
        cursor = con.execute(FIDELITY_SQL)
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def format_rows(rows: list[dict[str, object]]) -> str:
    """The fidelity rows as a Markdown table."""
    header = "| step | weight | captions | SSIM (higher: closer) | SSIM gain over no LoRA | colour chi2 (lower) | images |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        step = "— (no LoRA)" if r["step"] is None else r["step"]
        kind = "held out" if r["held_out"] else "trained"
        lines.append(f"| {step} | {r['weight']:g} | {kind} | {r['ssim']:.3f} | {r['ssim_gain']:+.3f} | "
                     f"{r['color_chi2']:.3f} | {r['images']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.caption_fidelity", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, help="where the sweep and its dataset go (default: the spec's)")
    args = parser.parse_args(argv)
    print(format_rows(run_sweep(args.output_dir)))


if __name__ == "__main__":
    main()
