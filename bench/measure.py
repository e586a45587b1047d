"""Measurement tools: result rows, medians of repeats, side-by-side ratios, load average, peak memory.

A row is one figure: the median of its repeats, the repeats themselves, and the 1-minute load
average when it was taken, because the machines running this are shared.
"""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One figure of the table: median of `samples`, with the load average when it was measured."""

    suite: str
    name: str
    unit: str
    samples: tuple[float, ...]
    note: str = ""
    load: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repeats: how much the figure moved between them."""
        return (max(self.samples) - min(self.samples)) / self.value if len(self.samples) > 1 else 0.0


def rate_row(suite: str, name: str, count: float, seconds: Sequence[float], unit: str, note: str = "") -> Row:
    """Throughput row: `count` items per second for each repeat's duration."""
    return Row(suite, name, unit, tuple(count / s for s in seconds), note)


def ratio_row(suite: str, name: str, numerator: Sequence[float], denominator: Sequence[float],
              note: str = "") -> Row:
    """Side-by-side ratio: the median of pairwise ratios of repeats measured next to each other."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{name}: {len(numerator)} vs {len(denominator)} repeats; pair them one to one")
    return Row(suite, name, "x", tuple(a / b for a, b in zip(numerator, denominator)), note)


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    """Seconds one call of `fn` takes (`sync` waits for queued GPU work before reading the clock)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def cuda_sync() -> None:
    """Wait for the GPU, when there is one, so a timing covers the work and not just its launch."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PeakRss:
    """Peak resident memory (MiB) of this process (and its children, if asked) while the block runs.

    psutil is sampled every `interval` s in a thread; without psutil the process-lifetime
    ru_maxrss is used, which cannot be reset, so the figure is then an upper bound. Listing
    children scans /proc, so it is only done when asked (the flow's training child processes).
    """

    def __init__(self, interval: float = 0.02, *, children: bool = False) -> None:
        self.interval = interval
        self.children = children
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        try:
            import psutil
        except ImportError:
            return self
        self._proc = psutil.Process()
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
            return
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        import psutil

        total = 0
        for proc in [self._proc, *(self._proc.children(recursive=True) if self.children else [])]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # a child that just exited
                continue
        self.peak_mb = max(self.peak_mb, total / 2**20)


class PeakCudaMemory:
    """Peak GPU memory allocated by torch (MiB) while the block runs; 0 without CUDA."""

    def __init__(self) -> None:
        self.peak_mb = 0.0

    def __enter__(self) -> PeakCudaMemory:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
