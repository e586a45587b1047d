"""Work another sweep under the same output folder already finished is used where it lies, not redone.

Ids are content ids, so a run or render job with the same id in another sweep folder is the same
work. Before tasks are submitted, each run and render job not finished in its own sweep folder but
finished in a sibling one is pointed at that folder (its `sweep_root`): the task then finds it done,
and the manifest records where its rows are (storage.catalog.Manifest.run_roots / render_roots).
Unfinished work elsewhere (a killed run) is not borrowed: it is trained here, from the start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from storage.history import sweep_roots
from storage.layout import SweepLayout
from tasks.sweep.plan import RenderJobSpec, TrainingRunSpec
from tasks.train.records import already_done

Work = TypeVar("Work", TrainingRunSpec, RenderJobSpec)


def finished_elsewhere(runs: list[TrainingRunSpec], output_dir: str) -> list[TrainingRunSpec]:
    """`runs`, each pointed at the sibling sweep folder that finished it when its own folder has not."""
    return [_moved(run, output_dir, lambda layout, r=run: already_done(r, layout)) for run in runs]


def rendered_elsewhere(jobs: list[RenderJobSpec], output_dir: str) -> list[RenderJobSpec]:
    """`jobs`, each pointed at the sibling sweep folder that rendered it when its own folder has not."""
    return [_moved(job, output_dir, lambda layout, j=job: layout.table_file("images", j.render_id).exists())
            for job in jobs]


def _moved(work: Work, output_dir: str, done) -> Work:
    own = Path(work.sweep_root).resolve()
    if done(SweepLayout(own)):
        return work
    for root in sweep_roots(Path(output_dir)):
        if root.resolve() != own and done(SweepLayout(root.resolve())):
            return work.model_copy(update={"sweep_root": str(root.resolve())})
    return work


def roots_elsewhere(items: list[TrainingRunSpec] | list[RenderJobSpec], own_root: Path, key: str) -> dict[str, str]:
    """id -> sweep folder for the items that live outside `own_root` (for the manifest)."""
    own = Path(own_root).resolve()
    return {getattr(i, key): str(Path(i.sweep_root).resolve()) for i in items
            if Path(i.sweep_root).resolve() != own}
