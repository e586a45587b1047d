"""The HTML report: built from a fake sweep's Parquet tables, escaped, self-contained, and
checked in a real headless Chromium (skipped when none is installed)."""

from __future__ import annotations

import html
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from PIL import Image, ImageDraw

from reports.__main__ import main as reports_main
from reports.build_report import build_report
from reports.report_data import load_sweep
from storage.layout import SweepLayout
from storage.parquet_io import write_rows
from storage.schema import IMAGES, RUNS
from tests.browser import (
    CDPSession,
    broken_images,
    open_file,
    page_session,
    screenshot_dirs,
    wait_for,
    wait_grid,
)

SWEEP_ID = "sweep-0001"
BASE = "tiny-sd15"
RANKS = (4, 8)
STEPS = (50, 100)
SAMPLERS = ("euler", "dpm++ 2m")
WEIGHTS = (0.5, 1.0)
SEEDS = (1, 2)
XSS = "<script>alert(1)</script>"
PROMPTS = ("a photo of sks cat on a red sofa", XSS)
# Stacked on every image, ours and the baseline, as tasks.render.job records them.
EXTRA_LORAS = json.dumps([{"name": "style", "path": "/loras/style.safetensors", "weight": 0.7, "sha256": "ab12" * 16},
                          {"name": "grain", "path": "/loras/grain.safetensors", "weight": 0.5, "sha256": "cd34" * 16}])
ERROR = "RuntimeError: CUDA out of memory.\nTried to allocate 2.00 GiB <b>not bold</b>"


def save_png(path: Path, color: tuple[int, int, int], mark: int) -> None:
    """A small coloured square with a white bar whose width encodes `mark`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (32, 32), color)
    ImageDraw.Draw(image).rectangle((2, 24, 2 + 6 * mark, 29), fill=(255, 255, 255))
    image.save(path)


def run_row(run_id: str, rank: int, status: str, error: str | None, layout: SweepLayout) -> dict[str, Any]:
    """A runs row; a column another stage adds to the schema reads as NULL (not recorded), as in old files."""
    return {name: None for name in RUNS.names} | {
        "sweep_id": SWEEP_ID, "run_id": run_id, "base_model": BASE, "base_model_path": "/models/tiny",
        "rank": rank, "alpha": rank / 2, "learning_rate": 1e-4, "max_steps": max(STEPS), "batch_size": 1,
        "resolution": 32, "seed": 0, "status": status, "error": error, "num_images": 4,
        "trainable_params": 1000 * rank, "steps_per_s": 35.0, "peak_memory_mb": 512.0,
        "wall_time_s": 3.0, "started_at": None, "finished_at": None, "run_dir": str(layout.run_dir(run_id)),
        "target_preset": "attention", "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "lora_dropout": 0.0,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "lr_cycles": 1, "gradient_accumulation_steps": 1,
        "effective_batch_size": 1, "min_snr_gamma": None, "noise_offset": 0.0, "mixed_precision": "no",
        "gradient_checkpointing": False, "optimizer": "adamw", "train_text_encoder": False, "text_encoder_lr": None,
        "validation_images": 0, "memory_preset_gib": None, "buckets": False, "bucket_step": None,
        "encoding_cache": "disk", "skipped_files": None, "max_grad_norm": None, "clip_skip": 1, "variant": None, "dataset_name": None,
        "class_prompt": None, "num_class_images": None, "prior_loss_weight": None,
    }


def image_row(layout: SweepLayout, n: int, render_id: str, run_id: str | None, rank: int | None,
              step: int | None, combo: tuple[str, float, int, int]) -> dict[str, Any]:
    """One image row; even images record a path relative to the sweep root, odd ones absolute."""
    sampler, weight, seed, prompt_index = combo
    image_id = f"img-{n:03d}"
    relative = Path("images") / render_id / f"{image_id}.png"
    color = ((rank or 0) * 25 % 256, (step or 0) * 2 % 256, 60 + 120 * SAMPLERS.index(sampler) + 30 * seed)
    save_png(layout.root / relative, color, int(weight * 2) + prompt_index)
    return {name: None for name in IMAGES.names} | {
        "sweep_id": SWEEP_ID, "image_id": image_id, "render_id": render_id, "base_model": BASE,
        "run_id": run_id, "checkpoint_id": f"{run_id}-{step}" if run_id else None, "rank": rank,
        "checkpoint_step": step, "sampler": sampler, "steps": 20, "lora_weight": weight if run_id else 0.0,
        "cfg_scale": 7.5, "prompt_index": prompt_index, "prompt": PROMPTS[prompt_index],
        "negative_prompt": "", "seed": seed, "width": 32, "height": 32,
        "path": str(relative if n % 2 == 0 else layout.root / relative), "render_s": 0.27,
        "extra_loras": EXTRA_LORAS, "precision": "fp32", "prompt_syntax": "a1111", "prompt_tokens": 5,
        "clip_skip": 1, "prompt_source": "spec", "source_image": None, "held_out": None,
    }


def metric_rows(image: dict[str, Any], baseline_ids: dict[tuple[str, int, int], str]) -> list[dict[str, Any]]:
    """clip_score peaks at rank 8 step 100; train_l2 (lower is better) at rank 4 step 50."""
    rank, step = image["rank"] or 0, image["checkpoint_step"] or 0
    rows = [{"metric": "clip_score", "value": 0.2 + rank / 100 + step / 1000 + image["seed"] / 1e4,
             "higher_is_better": True, "reference_id": None}]
    if image["run_id"]:
        key = (image["sampler"], image["seed"], image["prompt_index"])
        rows += [
            {"metric": "train_l2", "value": 1.0 + rank / 10 + step / 100 - image["lora_weight"] / 10,
             "higher_is_better": False, "reference_id": "dataset/train_00.png"},
            {"metric": "psnr_to_baseline_db", "value": 30.0 - step / 10,
             "higher_is_better": True, "reference_id": baseline_ids[key]},
        ]
    return [{"sweep_id": SWEEP_ID, "image_id": image["image_id"], **row} for row in rows]


def write_images(layout: SweepLayout) -> list[dict[str, Any]]:
    """Baseline images, then every LoRA checkpoint's grid; one Parquet file per render."""
    combos = list(itertools.product(SAMPLERS, WEIGHTS, SEEDS, range(len(PROMPTS))))
    baseline = [image_row(layout, n, "render-base", None, None, None, (s, 0.0, seed, p))
                for n, (s, seed, p) in enumerate(itertools.product(SAMPLERS, SEEDS, range(len(PROMPTS))))]
    write_rows("images", baseline, layout.table_file("images", "render-base"))
    images = list(baseline)
    for rank, step in itertools.product(RANKS, STEPS):
        render_id = f"render-r{rank}-s{step}"
        rows = [image_row(layout, len(images) + i, render_id, f"run-r{rank}", rank, step, combo)
                for i, combo in enumerate(combos)]
        write_rows("images", rows, layout.table_file("images", render_id))
        images += rows
    return images


def make_fake_sweep(root: Path) -> SweepLayout:
    """A complete small sweep: 2 ranks x 2 steps x 2 samplers x 2 weights x 2 seeds x 2 prompts."""
    layout = SweepLayout(root)
    save_png(root / "dataset" / "train_00.png", (200, 120, 40), 3)
    runs = [run_row(f"run-r{r}", r, "completed", None, layout) for r in RANKS]
    runs.append(run_row("run-r16", 16, "failed", ERROR, layout))
    write_rows("runs", runs, layout.table_file("runs", "all"))
    checkpoints, losses = [], []
    for rank, step in itertools.product(RANKS, STEPS):
        ckpt_dir = layout.checkpoint_dir(f"run-r{rank}", step)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "pytorch_lora_weights.safetensors").write_bytes(b"fake")
        (ckpt_dir / "kohya.safetensors").write_bytes(b"fake")
        checkpoints.append({
            "sweep_id": SWEEP_ID, "run_id": f"run-r{rank}", "checkpoint_id": f"run-r{rank}-{step}", "step": step,
            "lora_path": str((ckpt_dir / "pytorch_lora_weights.safetensors").relative_to(root)),
            "kohya_path": str(ckpt_dir / "kohya.safetensors"), "train_loss_smoothed": 0.1, "validation_loss": 0.12, "wall_time_s": 1.0,
        })
    for rank in RANKS:
        losses += [{"sweep_id": SWEEP_ID, "run_id": f"run-r{rank}", "step": s,
                    "loss": 0.3 * 0.98**s + 0.05 * ((s * 7919 + rank) % 11) / 11 + 0.01 * rank,
                    "learning_rate": 1e-4, "grad_norm": 0.5, "prior_loss": None} for s in range(1, max(STEPS) + 1)]
    write_rows("checkpoints", checkpoints, layout.table_file("checkpoints", "all"))
    write_rows("losses", losses, layout.table_file("losses", "all"))
    images = write_images(layout)
    baseline_ids = {(i["sampler"], i["seed"], i["prompt_index"]): i["image_id"] for i in images if not i["run_id"]}
    metrics = [row for image in images for row in metric_rows(image, baseline_ids)]
    write_rows("image_metrics", metrics, layout.table_file("image_metrics", "all"))
    spec = {"name": "fake-sweep", "sweep_id": SWEEP_ID, "prompts": list(PROMPTS),
            "provenance": {"git_sha": "0123abcd", "python": "3.11.7",
                           "versions": {"torch": "2.13.0", "diffusers": "0.36.0", "prefect": "3.8.8"}}}
    layout.spec_path.write_text(json.dumps(spec), encoding="utf-8")
    return layout


@pytest.fixture()
def sweep(tmp_path: Path) -> SweepLayout:
    return make_fake_sweep(tmp_path / "fake-sweep")


def grid_data(index_html: str) -> dict[str, Any]:
    """The JSON blob report.js reads first: axes, slice list, heatmap means."""
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', index_html, re.S)
    assert match, "report-data script missing"
    return json.loads(match.group(1))


def slice_payload(index: Path, file: str) -> Any:
    """The payload of one data/*.js slice file: `loraSweepSlice(kind, number, payload);`."""
    text = (index.parent / file).read_text(encoding="utf-8")
    assert text.startswith("loraSweepSlice(") and text.endswith(");\n"), file
    return json.loads("[" + text[len("loraSweepSlice("):-3] + "]")[2]


def report_images(index: Path) -> list[dict[str, Any]]:
    """Every image the report's slices hold, in slice order: src, axis value indexes, details, metrics."""
    data = grid_data(index.read_text(encoding="utf-8"))
    images = []
    for entry in data["grid"]:
        payload = slice_payload(index, entry["file"])
        images += [{"src": payload["folders"][row[0]] + "/" + row[1], "ax": row[2:]} for row in payload["rows"]]
    details = [row for file in data["details"] for row in slice_payload(index, file)]
    assert len(details) == len(images)
    for image, (extra, metrics) in zip(images, details):
        image.update(extra=extra, metrics=metrics)
    return images


def test_prompt_and_error_are_escaped(sweep: SweepLayout) -> None:
    text = build_report(sweep.root).read_text(encoding="utf-8")
    assert XSS not in text
    assert html.escape(XSS, quote=False) in text
    assert "&lt;b&gt;not bold&lt;/b&gt;" in text
    blob = re.search(r'id="report-data">(.*?)</script>', text, re.S).group(1)
    assert "</" not in blob and "<" not in blob
    assert all("<" not in f.read_text(encoding="utf-8") for f in (sweep.report_dir / "data").iterdir())
    prompt_axis = next(axis for axis in grid_data(text)["axes"] if axis["name"] == "prompt")
    assert XSS in prompt_axis["titles"]


def test_every_referenced_file_exists(sweep: SweepLayout) -> None:
    index = build_report(sweep.root)
    text = index.read_text(encoding="utf-8")
    images = report_images(index)
    assert len(images) == 8 + 2 * 2 * 2 * 2 * 2 * 2
    srcs = {image["src"] for image in images}
    srcs |= {m["ref"]["src"] for image in images for m in image["metrics"] if m["ref"] and m["ref"]["src"]}
    links = set(re.findall(r'(?:src|href)="([^"#:]+)"', text))
    assert "report.js" in links and "report.css" in links
    assert any(link.endswith("pytorch_lora_weights.safetensors") for link in links)
    for link in srcs | links:
        assert not Path(link).is_absolute(), link
        assert (index.parent / unquote(html.unescape(link))).is_file(), link
    assert all(src.startswith("../images/") for src in {i["src"] for i in images})


def test_summary_failures_and_best(sweep: SweepLayout) -> None:
    text = build_report(sweep.root).read_text(encoding="utf-8")
    assert "RuntimeError: CUDA out of memory." in text and 'id="failed"' in text
    assert "0123abcd" in text and "2.13.0" in text
    assert text.count("<polyline") == 6  # two runs: raw, smoothed and validation at the checkpoints
    assert text.count('class="validation-dot"') == len(RANKS) * len(STEPS)
    best = {row["metric"]: row for row in load_sweep(sweep.root).best}
    assert (best["clip_score"]["rank"], best["clip_score"]["step"]) == (8, 100)
    assert (best["train_l2"]["rank"], best["train_l2"]["step"]) == (4, 50)
    assert (best["psnr_to_baseline_db"]["rank"], best["psnr_to_baseline_db"]["step"]) == (4, 50)


def render_outcome(render_id: str, run_id: str | None, step: int | None, error: str | None) -> dict[str, Any]:
    """A `renders` row as the flow writes it (flows/render_outcomes.py)."""
    return {"sweep_id": SWEEP_ID, "render_id": render_id, "base_model": BASE, "run_id": run_id,
            "checkpoint_id": f"{run_id}-{step}" if run_id else None, "checkpoint_step": step,
            "status": "failed" if error else "completed", "error": error, "planned_images": 8,
            "recorded_at": None}


def test_failed_render_jobs_are_listed_and_counted_in_the_summary(sweep: SweepLayout) -> None:
    assert 'id="failed-renders"' not in build_report(sweep.root).read_text(encoding="utf-8")
    outcomes = {"render-base-failed": render_outcome("render-base-failed", None, None, f"OSError: disk full {XSS}"),
                "render-r4-s50": render_outcome("render-r4-s50", "run-r4", 50, None)}
    for render_id, row in outcomes.items():
        write_rows("renders", [row], sweep.table_file("renders", render_id))
    text = build_report(sweep.root).read_text(encoding="utf-8")
    assert "1 render job(s) failed" in text and 'id="failed-renders"' in text
    section = text.split('id="failed-renders"')[1].split("</section>")[0]
    assert "render-base-failed" in section and "baseline (no LoRA)" in section
    assert "OSError: disk full" in section and XSS not in text  # escaped like every error
    assert "render-r4-s50" not in section  # a completed job is not a failure


def test_empty_and_partial_sweeps_build(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    empty = build_report(tmp_path / "empty")
    assert "No images rendered yet" in empty.read_text(encoding="utf-8")
    partial = SweepLayout(tmp_path / "partial")
    write_rows("runs", [run_row("run-x", 4, "failed", "boom", partial)], partial.table_file("runs", "x"))
    text = build_report(partial.root).read_text(encoding="utf-8")
    assert "boom" in text and "No training loss recorded yet" in text


def options_cells(index_html: str) -> dict[str, str]:
    """The runs table's options cell per run id, as text."""
    rows = re.findall(r'<tr data-run="([^"]*)"[^>]*>(.*?)</tr>', index_html, re.S)
    cells = {run_id: re.search(r'<td class="options">(.*?)</td>', row, re.S) for run_id, row in rows}
    return {html.unescape(run_id): html.unescape(re.sub(r"<[^>]+>", "", cell.group(1)))
            for run_id, cell in cells.items()}


def test_runs_table_shows_options_that_differ_from_the_defaults(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = SweepLayout(tmp_path / "sweep")
    old = {k: v for k, v in run_row("run-old", 4, "completed", None, layout).items()
           if RUNS.get_field_index(k) <= RUNS.get_field_index("run_dir")}  # the runs schema before the options
    layout.table_dir("runs").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([old], schema=pa.schema([RUNS.field(n) for n in old])),
                   layout.table_file("runs", "old"))
    assert options_cells(build_report(layout.root).read_text(encoding="utf-8")) == {"run-old": ""}
    tuned = {**run_row("run-tuned", 8, "completed", None, layout), "target_preset": "locon",
             "lora_dropout": 0.1, "lr_scheduler": "cosine", "lr_warmup_steps": 10, "gradient_accumulation_steps": 4,
             "effective_batch_size": 4, "min_snr_gamma": 5.0, "noise_offset": 0.05, "mixed_precision": "bf16",
             "gradient_checkpointing": True, "optimizer": "adamw8bit", "train_text_encoder": True,
             "text_encoder_lr": 5e-5, "validation_images": 2, "memory_preset_gib": 12.0, "buckets": True,
             "bucket_step": 64, "encoding_cache": "off", "max_grad_norm": 1.0, "clip_skip": 2, "variant": None,
             "dataset_name": None}
    own = {**run_row("run-own", 16, "completed", None, layout), "target_preset": None,
           "target_modules": ["to_q", "conv1"], "lr_scheduler": "cosine_with_restarts", "lr_cycles": 3,
           "encoding_cache": "memory"}
    write_rows("runs", [run_row("run-plain", 4, "completed", None, layout), tuned, own],
               layout.table_file("runs", "new"))
    assert options_cells(build_report(layout.root).read_text(encoding="utf-8")) == {
        "run-old": "",  # written before the option columns: says nothing, claims no defaults
        "run-plain": "defaults",
        "run-tuned": "locon · dropout 0.1 · cosine (warmup 10) · accumulation 4 (batch 4) · min-SNR 5 · "
                     "noise offset 0.05 · bf16 · gradient checkpointing · adamw8bit · memory preset 12 GiB · "
                     "buckets (step 64) · 2 validation images · encoding cache off · grad clip 1 · clip skip 2 · "
                     "text encoder LR 5e-5",
        "run-own": "modules to_q, conv1 · cosine_with_restarts (3 cycles)",
    }


def test_extra_loras_are_listed_once_and_shown_with_each_image(sweep: SweepLayout, tmp_path: Path) -> None:
    text = build_report(sweep.root).read_text(encoding="utf-8")
    line = re.search(r'<p class="extra-loras" id="extra-loras">(.*?)</p>', text, re.S).group(1)
    assert re.sub(r"<[^>]+>", "", line) == "Extra LoRAs stacked on the images: + style 0.7, grain 0.5"
    table = re.search(r'<table class="kv extra-loras">(.*?)</table>', text, re.S).group(1)
    assert [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:]] == [
        ["style 0.7", "<code>" + "ab12" * 3 + "</code>", "72", "/loras/style.safetensors"],
        ["grain 0.5", "<code>" + "cd34" * 3 + "</code>", "72", "/loras/grain.safetensors"]]
    images = report_images(sweep.report_dir / "index.html")
    assert all(dict(image["extra"])["extra_loras"] == "+ style 0.7, grain 0.5" for image in images)
    plain = SweepLayout(tmp_path / "plain")
    rows = [{**image_row(plain, 0, "render-base", None, None, None, ("euler", 0.0, 1, 0)), "extra_loras": None}]
    write_rows("images", rows, plain.table_file("images", "render-base"))
    text = build_report(plain.root).read_text(encoding="utf-8")
    plain_image = report_images(plain.report_dir / "index.html")[0]
    assert "extra-loras" not in text and "extra_loras" not in dict(plain_image["extra"])


def test_cli_rebuilds_report(sweep: SweepLayout, capsys: pytest.CaptureFixture[str]) -> None:
    assert reports_main([str(sweep.root)]) == 0
    assert Path(capsys.readouterr().out.strip()) == sweep.report_dir / "index.html"
    assert sorted(p.name for p in sweep.report_dir.iterdir()) == ["data", "index.html", "report.css", "report.js"]


HEADERS_JS = "Array.from(document.querySelectorAll('#grids thead th.col')).map(t => t.textContent)"
SET_AXIS_JS = """(() => { const s = document.getElementById('axis-%s'); s.value = '%s';
  s.dispatchEvent(new Event('change', {bubbles: true})); return s.value; })()"""
GRID_TITLES_JS = "Array.from(document.querySelectorAll('#grids .z-title')).map(t => t.textContent)"
VIEWER_READY = "document.getElementById('viewer').dataset.state === 'ready'"


def set_axis(page: CDPSession, role: str, name: str) -> str:
    """Choose an axis for X, Y or Z as a user would, wait for the grid to redraw, return the select's value."""
    value = page.evaluate(SET_AXIS_JS % (role, name))
    wait_grid(page)
    return value


@pytest.fixture()
def page() -> Iterator[CDPSession]:
    """A headless Chromium page; skips (printing why) when Chromium is missing or cannot start."""
    yield from page_session()


@pytest.mark.timeout(60)
def test_report_in_headless_chromium(sweep: SweepLayout, page: CDPSession, tmp_path: Path) -> None:
    index = build_report(sweep.root)
    open_file(page, index)
    wait_grid(page)
    assert page.evaluate("document.images.length") == 4  # 2 ranks x 2 checkpoint steps
    assert broken_images(page) == []
    assert page.evaluate(HEADERS_JS) == ["50", "100"]  # default X: checkpoint step
    assert set_axis(page, "x", "sampler") == "sampler"
    assert page.evaluate(HEADERS_JS) == sorted(SAMPLERS)
    assert set_axis(page, "z", "seed") == "seed"
    assert page.evaluate(GRID_TITLES_JS) == ["seed = 1", "seed = 2"]
    assert set_axis(page, "z", "") == ""
    assert set_axis(page, "x", "prompt") == "prompt"
    assert XSS in page.evaluate(HEADERS_JS)  # shown as text, never run
    assert broken_images(page) == []
    assert page.evaluate("document.body.innerText.includes('CUDA out of memory')")
    for folder in screenshot_dirs(tmp_path):
        page.screenshot(folder / "report.png")
    page.evaluate("document.querySelector('#grids a.thumb').click()")
    assert page.evaluate("document.getElementById('viewer').open")
    assert wait_for(page, VIEWER_READY)  # its metrics come from a detail file read on demand
    assert page.evaluate("document.getElementById('viewer-title').textContent").endswith(" · + style 0.7, grain 0.5")
    assert "train_l2" in page.evaluate("document.getElementById('viewer-metrics').innerText")
    assert broken_images(page) == []  # the viewer's image and the metrics' reference images
    for folder in screenshot_dirs(tmp_path):
        page.screenshot(folder / "report-viewer.png", full_page=False)
    page.evaluate("document.getElementById('viewer-close').click()")
    assert set_axis(page, "x", "rank") == "rank"  # Y had rank: it takes X's old axis
    assert page.evaluate("document.getElementById('axis-y').value") == "prompt"
    empty_root = tmp_path / "empty-sweep"
    empty_root.mkdir()
    open_file(page, build_report(empty_root))
    assert "No images rendered yet" in page.evaluate("document.body.innerText")
    assert page.console_errors() == []
    assert not [e for e in page.events if e["method"] == "Page.javascriptDialogOpening"]
    assert (tmp_path / "report.png").stat().st_size > 10_000



def test_skipped_dataset_files_are_listed_once(tmp_path: Path) -> None:
    layout = SweepLayout(tmp_path / "skips")
    skipped = ["broken.png: not a readable image (cannot identify image file)", "tiny.png: 16x16 is too small"]
    rows = [{**run_row(f"run-{r}", r, "completed", None, layout), "skipped_files": skipped} for r in (4, 8)]
    write_rows("runs", rows, layout.table_file("runs", "all"))
    text = build_report(layout.root).read_text(encoding="utf-8")
    section = re.search(r'<h3 id="skipped">(.*?)</ul>', text, re.S).group(1)
    assert "Dataset files left out (2)" in section
    assert re.findall(r"<li><code>(.*?)</code></li>", section) == skipped


def two_learning_rates(layout: SweepLayout) -> None:
    """Rewrite the fake sweep's runs: rank 8 trained at 5e-5 as variant "slow" on dataset "set-b"."""
    rows = [run_row(f"run-r{r}", r, "completed", None, layout) for r in RANKS]
    rows[1].update(learning_rate=5e-5, variant="slow", dataset_name="set-b")
    rows[0].update(variant="fast", dataset_name="set-a")
    write_rows("runs", rows, layout.table_file("runs", "all"))


HEAT_JS = """(() => { const s = document.getElementById('heat-%s'); s.value = '%s';
  s.dispatchEvent(new Event('change', {bubbles: true}));
  return Array.from(document.querySelectorAll('#heatmaps-out figure')).map(f => f.dataset.metric); })()"""


@pytest.mark.timeout(60)
def test_training_axes_are_grid_heatmap_and_effect_choices(sweep: SweepLayout, page: CDPSession) -> None:
    two_learning_rates(sweep)
    index = build_report(sweep.root)
    text = index.read_text(encoding="utf-8")
    choices = {axis["name"] for axis in grid_data(text)["axes"]}
    assert {"learning_rate", "variant", "dataset_name", "rank", "checkpoint_step"} <= choices
    assert not choices & {"optimizer", "cfg_scale", "lr_scheduler"}  # the same for every image: no choice
    effect = re.search(r'data-metric="clip_score" data-axis="learning_rate">.*?<tbody>(.*?)</tbody>', text, re.S)
    rows = re.findall(r"<tr( class=\"best\")?><th>(.*?)</th>", effect.group(1))
    assert [(bool(best), value) for best, value in rows] == [(True, "5e-05"), (False, "0.0001")]  # rank 8 scores higher
    open_file(page, index)
    wait_grid(page)
    options = page.evaluate("Array.from(document.querySelectorAll('#axis-x option')).map(o => o.value)")
    assert "learning_rate" in options and "optimizer" not in options
    assert set_axis(page, "x", "learning_rate") == "learning_rate"
    assert page.evaluate(HEADERS_JS) == ["5e-05", "0.0001"]
    assert page.evaluate("document.querySelectorAll('#grids img').length") == 2  # rank 8 at 5e-5, rank 4 at 1e-4
    assert broken_images(page) == []
    assert set_axis(page, "z", "variant") == "variant"
    assert page.evaluate(GRID_TITLES_JS) == ["training variant = fast", "training variant = slow"]
    assert page.evaluate(HEAT_JS % ("rows", "learning_rate")) == ["clip_score", "psnr_to_baseline_db", "train_l2"]
    rows = page.evaluate("Array.from(document.querySelectorAll('#heatmaps-out figure')[0]"
                         ".querySelectorAll('tbody th')).map(t => t.textContent)")
    assert rows == ["5e-05", "0.0001"]
    assert page.console_errors() == []
