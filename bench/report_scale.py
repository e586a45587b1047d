"""`python -m bench.report_scale [--sizes 2000,10000,40000,150000] [--code DIR]`: the report at sweep scale.

Writes a synthetic sweep of about N image rows in the project's schema (Parquet per render job, as the
flow writes them; every image file a hard link to one PNG), builds its report with the reports package
found under --code (default: this checkout; pass a `git worktree` of an older commit to compare), and
prints: index.html size, the size of everything the report wrote, build wall time, build peak memory
(the building process's max RSS), and headless-Chromium times: to a usable first grid, and to a usable
grid after every filter is set to "all" (with how many images the page then holds). Numbers only, no
thresholds: these machines are shared.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from storage.schema import CHECKPOINTS as CHECKPOINTS_SCHEMA
from storage.schema import IMAGES, LOSSES, RUNS

REPO = Path(__file__).resolve().parent.parent
RANKS, LEARNING_RATES, CHECKPOINTS = (4, 8, 16, 32), (1e-4, 5e-5), (250, 500, 750, 1000)
SAMPLERS, STEPS, WEIGHTS = ("Euler a", "DPM++ 2M Karras"), (20, 30), (0.5, 0.8, 1.0)
PROMPTS = tuple(f"a photo of zqx shape number {i}, on a teal background, high detail" for i in range(4))
PER_SEED = len(RANKS) * len(LEARNING_RATES) * len(CHECKPOINTS) * len(SAMPLERS) * len(STEPS) * len(WEIGHTS) * \
    len(PROMPTS) + len(SAMPLERS) * len(STEPS) * len(PROMPTS)  # LoRA images + the baseline, per seed
USABLE_JS = ("document.querySelectorAll('#grids img').length > 0 && "
             "['ready', undefined].includes(document.getElementById('grids').dataset.state)")
ALL_FILTERS_JS = """(() => { const selects = Array.from(document.querySelectorAll('.filters select'));
  selects.forEach(s => { s.value = '*'; }); selects.forEach(s => s.dispatchEvent(new Event('change', {bubbles: true})));
  return selects.length; })()"""


def run_row(run_id: str, rank: int, lr: float, layout: SweepLayout) -> dict[str, Any]:
    return {name: None for name in RUNS.names} | {
        "sweep_id": "scale", "run_id": run_id, "base_model": "tiny-sd15", "rank": rank, "alpha": float(rank),
        "learning_rate": lr, "max_steps": max(CHECKPOINTS), "batch_size": 1, "resolution": 64, "seed": 0,
        "status": "completed", "num_images": 12, "trainable_params": 1000 * rank, "steps_per_s": 20.0,
        "peak_memory_mb": 900.0, "wall_time_s": 50.0, "run_dir": str(layout.run_dir(run_id)),
        "target_preset": "attention", "lr_scheduler": "constant", "optimizer": "adamw"}


def image_rows(render_id: str, run: dict[str, Any] | None, step: int | None, seeds: int,
               start: int) -> list[dict[str, Any]]:
    weights = WEIGHTS if run else (0.0,)
    rows = []
    for n, (sampler, steps, weight, p, seed) in enumerate(
            itertools.product(SAMPLERS, STEPS, weights, range(len(PROMPTS)), range(seeds)), start=start):
        image_id = f"{n:08x}{render_id[-8:]}"
        rows.append({name: None for name in IMAGES.names} | {
            "sweep_id": "scale", "image_id": image_id, "render_id": render_id, "base_model": "tiny-sd15",
            "run_id": run and run["run_id"], "checkpoint_id": run and f"{run['run_id']}-{step}",
            "rank": run and run["rank"], "checkpoint_step": step, "sampler": sampler, "steps": steps,
            "lora_weight": weight, "cfg_scale": 7.0, "prompt_index": p, "prompt": PROMPTS[p], "negative_prompt": "",
            "seed": 1000 + seed, "width": 64, "height": 64, "path": f"images/{render_id}/{image_id}.png",
            "render_s": 0.2, "precision": "fp32", "prompt_syntax": "a1111", "prompt_tokens": 14})
    return rows


def metric_rows(images: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    out = []
    for i, image in enumerate(images):
        rank, step = image["rank"] or 0, image["checkpoint_step"] or 0
        out += [{"sweep_id": "scale", "image_id": image["image_id"], "metric": "clip_score",
                 "value": 0.2 + rank / 400 + step / 1e4 + (i % 7) / 1e3, "higher_is_better": True,
                 "reference_id": None},
                {"sweep_id": "scale", "image_id": image["image_id"], "metric": "train_l2",
                 "value": 1.0 - step / 1e4 + (i % 5) / 100, "higher_is_better": False,
                 "reference_id": "dataset/train_00.png"},
                {"sweep_id": "scale", "image_id": image["image_id"], "metric": "psnr_to_baseline_db",
                 "value": 30.0 - step / 100, "higher_is_better": True, "reference_id": baseline}]
    return out


def write_render(layout: SweepLayout, render_id: str, rows: list[dict[str, Any]], baseline: str, png: Path) -> None:
    write_rows("images", rows, layout.table_file("images", render_id))
    write_rows("image_metrics", metric_rows(rows, baseline), layout.table_file("image_metrics", render_id))
    folder = layout.render_dir(render_id)
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / f"{rows[0]['image_id']}.png"
    shutil.copyfile(png, first)  # one inode per render folder: a file system allows only so many links to one
    for row in rows[1:]:
        os.link(first, folder / f"{row['image_id']}.png")


def make_synthetic_sweep(root: Path, images: int) -> int:
    """A finished sweep of about `images` image rows (seeds scale it); returns the exact number of rows."""
    layout = SweepLayout(root)
    seeds = max(1, round(images / PER_SEED))
    png = root / "one.png"
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (20, 140, 140)).save(png)
    (root / "dataset").mkdir(exist_ok=True)
    Image.new("RGB", (64, 64), (200, 60, 200)).save(root / "dataset" / "train_00.png")
    runs = [run_row(f"run-r{r}-lr{k}", r, lr, layout) for r in RANKS for k, lr in enumerate(LEARNING_RATES)]
    write_rows("runs", runs, layout.table_file("runs", "all"))
    losses = [{name: None for name in LOSSES.names} | {
        "sweep_id": "scale", "run_id": run["run_id"], "step": s, "loss": 0.2 + 0.1 / s,
        "learning_rate": run["learning_rate"], "grad_norm": 0.5}
        for run in runs for s in range(1, max(CHECKPOINTS) + 1)]
    write_rows("losses", losses, layout.table_file("losses", "all"))
    base = image_rows("render-baseline0", None, None, seeds, 0)
    write_render(layout, "render-baseline0", base, "", png)
    total, checkpoints = len(base), []
    for run, step in itertools.product(runs, CHECKPOINTS):
        render_id = f"render-{run['run_id']}-{step:05d}"
        rows = image_rows(render_id, run, step, seeds, total)
        write_render(layout, render_id, rows, base[total % len(base)]["image_id"], png)
        total += len(rows)
        checkpoints.append({name: None for name in CHECKPOINTS_SCHEMA.names} | {
                            "sweep_id": "scale", "run_id": run["run_id"], "checkpoint_id": f"{run['run_id']}-{step}",
                            "step": step, "lora_path": None, "kohya_path": None, "train_loss_smoothed": 0.2,
                            "validation_loss": None, "wall_time_s": 10.0})
    write_rows("checkpoints", checkpoints, layout.table_file("checkpoints", "all"))
    layout.spec_path.write_text(json.dumps({"name": f"scale-{total}", "sweep_id": "scale"}), encoding="utf-8")
    return total


BUILD = """import json, resource, sys, time
sys.path.insert(0, {code!r})
from reports.build_report import build_report
started = time.perf_counter()
build_report({root!r})
print(json.dumps({{"build_s": time.perf_counter() - started,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def measure_build(code: Path, root: Path, timeout: float) -> dict[str, Any]:
    """Build the report in a fresh process (its own max RSS is the build's peak memory)."""
    shutil.rmtree(root / "report", ignore_errors=True)  # sizes count this build's files only
    try:
        done = subprocess.run([sys.executable, "-c", BUILD.format(code=str(code), root=str(root))],
                              check=False, cwd=code,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"build over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1]}
    result = json.loads(next(line for line in done.stdout.splitlines()[::-1] if line.startswith('{"build_s"')))
    report = root / "report"
    result["index_mb"] = (report / "index.html").stat().st_size / 1e6
    result["report_mb"] = sum(p.stat().st_size for p in report.rglob("*") if p.is_file()) / 1e6
    return result


def measure_browser(index: Path, timeout: float) -> dict[str, Any]:
    """Seconds from navigation to a grid with images that answers, then the same after every filter is "all"."""
    from tests.browser import Chromium, wait_for

    out: dict[str, Any] = {}
    with Chromium(width=1400, height=1000) as page:
        started = time.perf_counter()
        page.send("Page.navigate", {"url": index.resolve().as_uri()}, timeout=timeout)
        try:
            out["usable_s"] = time.perf_counter() - started if wait_for(page, USABLE_JS, timeout) else None
            started = time.perf_counter()
            page.evaluate(ALL_FILTERS_JS, timeout=timeout)
            ok = wait_for(page, USABLE_JS, timeout)
            out["all_filters_s"] = time.perf_counter() - started if ok else None
            out["all_filters_dom_images"] = page.evaluate("document.querySelectorAll('#grids img').length",
                                                          timeout=timeout)
        except (TimeoutError, RuntimeError) as error:  # a page too busy to answer in time
            out.setdefault("usable_s", None)
            out["browser_error"] = f"no answer within {timeout:.0f} s ({type(error).__name__})"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000,40000,150000", help="image rows, comma-separated")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose reports package builds the report")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-sweep-report-scale"), help="synthetic sweeps")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per build and per browser step")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args(argv)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        root = args.work / f"sweep-{size}"
        if not (root / "spec.json").is_file():
            make_synthetic_sweep(root, size)
        rows = sum(1 for _ in (root / "images").rglob("*.png"))
        result = {"images": rows, "code": str(args.code), **measure_build(args.code.resolve(), root, args.timeout)}
        if not args.no_browser and "error" not in result:
            result.update(measure_browser(root / "report" / "index.html", args.timeout))
        print(json.dumps(result), flush=True)
        results.append(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
