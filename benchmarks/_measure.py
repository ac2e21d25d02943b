"""Timing and peak-memory helpers shared by the benchmark scripts (same-process ratios).

Memory is read in a child process of the same script (`memory_phase`), started with glibc
serving allocations over 64 KiB by mmap so resident memory follows live tensors; baseline and
candidate are measured in that one child. Times come from the parent, with the normal allocator.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable

MEMORY_FLAG = "--memory-phase"


def time_calls(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Median seconds per call of each fn, measured in interleaved rounds (baseline and candidates
    alternate, so drifts in machine speed hit them alike), after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_mb(fn: Callable[[], object], repeats: int = 3) -> float:
    """Peak resident memory (MB) above the level before the calls, sampled every 0.2 ms
    (meaningful in the memory phase, see module doc)."""
    fn()
    base = peak = _rss_bytes()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for _ in range(repeats):
        fn()
    stop.set()
    thread.join()
    return (max(peak, _rss_bytes()) - base) / 2**20


def in_memory_phase() -> bool:
    return MEMORY_FLAG in sys.argv


def memory_phase(results: object | None = None) -> dict:
    """In the child: print `results` as JSON. In the parent: run the child, return its JSON."""
    if in_memory_phase():
        print(json.dumps(results))
        return {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    out = subprocess.run([sys.executable, sys.argv[0], *sys.argv[1:], MEMORY_FLAG], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
