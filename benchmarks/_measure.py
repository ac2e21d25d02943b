"""Timing and peak-memory helpers shared by the benchmark scripts (same-process ratios)."""

from __future__ import annotations

import ctypes
import statistics
import threading
import time
from typing import Callable

import torch

# Serve allocations over 64 KiB with mmap (and give them back on free), so resident memory
# follows live tensors instead of glibc's heap high-water mark (M_MMAP_THRESHOLD = -3).
ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (CPU runs)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def measure(fn: Callable[[], object], repeats: int = 5) -> tuple[float, float]:
    """(median seconds, peak extra MB) of fn() after one warm-up call.

    Times are taken without the memory sampler running; memory in one extra sampled call.
    """
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    with PeakRSS() as mem:
        fn()
    return statistics.median(times), mem.delta_mb


def cuda_peak(fn: Callable[[], object]) -> float:
    """Peak CUDA memory (MB) allocated during fn()."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
