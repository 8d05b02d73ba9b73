"""One large image's row-wise work split over a few threads: `Classifier.predict_one` has a single
image and every core. numpy's `take` and Pillow's resample release the GIL, so bands of rows run
truly in parallel."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _LOCK:
        if workers not in _POOLS:   # standing threads for the process's life: none to start per image
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="cxr-band")
        return _POOLS[workers]


def run_bands(work, start: int, stop: int, threads: int) -> None:
    """Call work(a, b) on `threads` consecutive, near-equal ranges covering start..stop.

    The first range runs in the calling thread, the others on a standing pool; returns when all have
    finished and re-raises the first error. threads <= 1 (or a range too short to split): one call."""
    cuts = np.linspace(start, stop, max(1, int(threads)) + 1).round().astype(int)
    ranges = [(int(a), int(b)) for a, b in zip(cuts, cuts[1:]) if b > a]
    if len(ranges) <= 1:
        work(start, stop)
        return
    futures = [_pool(len(ranges) - 1).submit(work, a, b) for a, b in ranges[1:]]
    try:
        work(*ranges[0])
    finally:
        wait(futures)
    for f in futures:
        f.result()
