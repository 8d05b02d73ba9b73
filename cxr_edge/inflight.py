"""Decoding in flight: a memory budget in BYTES and a time limit per input, for Classifier.stream.

Memory. Each input's decode working set is estimated from its header before it is decoded
(`decode.estimate_bytes`: pixels x bytes per pixel, no pixel data read). A worker may start an input
only while the estimates of everything being decoded stay within the budget (default
DEFAULT_DECODE_BUDGET = 1 GiB; `Classifier(decode_budget=…)`, `cxr-edge classify --decode-memory MB`,
or the environment variable CXR_EDGE_DECODE_MEMORY_MB). An input whose estimate alone exceeds the
budget still runs, alone. Decoded full-resolution pixels are dropped as soon as the model tensor
exists; tensors waiting for a batch are bounded by the same budget (never fewer than one batch).

Time. An input that has been decoding for longer than the limit (DEFAULT_DECODE_TIMEOUT = 60 s;
`decode_timeout=`, `--decode-timeout`) becomes an error row and the run goes on. Decoding runs in
daemon threads, and a thread past its deadline is ABANDONED (Python cannot stop a thread): a
replacement worker starts, the abandoned one finishes or hangs in the background, its result is
discarded, and it cannot keep the process from exiting. Threads rather than one subprocess per
input because decoding is on the hot path (a subprocess costs an interpreter start and a copy of
every full-resolution image), the hang the fuzzer found is rare, and the memory bombs that a
subprocess would contain are refused from header sizes before any allocation (streams.py). The
cost: an abandoned thread may keep a CPU core and its memory until it ends; after
MAX_ABANDONED threads the remaining inputs are refused rather than piling up more.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future

DEFAULT_DECODE_BUDGET = 1 << 30          # bytes of decode working set in flight
DEFAULT_DECODE_TIMEOUT = 60.0            # seconds one input may spend decoding
MAX_BATCH_SIZE = 1024
MAX_ABANDONED = 8


def budget_from_env(default: int = DEFAULT_DECODE_BUDGET) -> int:
    """Decode budget in bytes: $CXR_EDGE_DECODE_MEMORY_MB (MiB, fractional ok), else `default` (also if unparsable)."""
    v = os.environ.get("CXR_EDGE_DECODE_MEMORY_MB")
    try:
        return int(float(v) * (1 << 20)) if v else default
    except ValueError:
        return default


class ByteBudget:
    """A counting semaphore over bytes. acquire(n) blocks until n more bytes fit in the budget, or
    nothing else is held (one over-budget input may still run alone)."""

    def __init__(self, total: int):
        self.total = int(total)
        self.held = 0
        self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        """Block until `n` more bytes fit in the budget, or nothing else is held; then hold them."""
        with self._cv:
            while self.held and self.held + n > self.total:
                self._cv.wait()
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        """Give back `n` bytes (never below 0) and wake the waiters."""
        with self._cv:
            self.held = max(0, self.held - n)
            self._cv.notify_all()


class _Task:
    __slots__ = ("fn", "arg", "cost", "future", "started", "abandoned", "finished")

    def __init__(self, fn, arg, cost):
        self.fn, self.arg, self.cost = fn, arg, cost
        self.future: Future = Future()
        self.started: float | None = None
        self.abandoned = False
        self.finished = False


class DecodePool:
    """Daemon worker threads that run fn(arg) within a ByteBudget; `wait(task)` returns fn's result,
    or raises TimeoutError once the task has RUN (not queued) for longer than `timeout` seconds."""

    def __init__(self, workers: int, budget: int, timeout: float, name: str = "cxr-decode"):
        self.budget = ByteBudget(budget)
        self.timeout = float(timeout)
        self.name = name
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.abandoned = 0
        self._closed = False
        self._workers = 0
        self._threads: list[threading.Thread] = []
        for _ in range(max(1, workers)):
            self._spawn()

    def _spawn(self):
        with self._lock:
            self._workers += 1
            n = self._workers
        t = threading.Thread(target=self._run, name=f"{self.name}-{n}", daemon=True)
        self._threads.append(t)
        t.start()

    def _run(self):
        while True:
            task = self._q.get()
            if task is None:
                return
            if self._closed:                 # the consumer is gone: queued inputs are not decoded
                task.future.cancel()
                continue
            if not task.future.set_running_or_notify_cancel():
                continue
            self.budget.acquire(task.cost)
            task.started = time.monotonic()
            result, error = None, None
            try:
                result = task.fn(task.arg)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                error = e
            with self._lock:                 # finishing and abandoning exclude each other
                abandoned = task.abandoned
                if not abandoned:
                    task.finished = True
            if abandoned:
                return                       # a replacement worker took this one's place
            self.budget.release(task.cost)
            if error is not None:
                task.future.set_exception(error)
            else:
                task.future.set_result(result)

    def submit(self, fn, arg, cost: int) -> _Task:
        """Queue fn(arg) with an estimated `cost` in bytes; returns the task to pass to `wait`.

        After MAX_ABANDONED hung decoders the task is not started: `wait` raises RuntimeError for it.
        """
        task = _Task(fn, arg, max(0, int(cost)))
        if self.abandoned >= MAX_ABANDONED:
            task.future.set_exception(RuntimeError(f"{self.abandoned} decoders hung already; input not started"))
            task.started = time.monotonic()
            return task
        self._q.put(task)
        return task

    def wait(self, task: _Task):
        """fn's result for `task` (re-raising what fn raised).

        Raises:
            TimeoutError: the task has run for `timeout` seconds or more; its thread is abandoned and replaced.
        """
        while True:
            started = task.started
            left = 0.25 if started is None else started + self.timeout - time.monotonic()
            try:
                return task.future.result(timeout=max(0.0, left))
            except TimeoutError:
                if task.started is not None and time.monotonic() - task.started >= self.timeout:
                    if not self._abandon(task):
                        continue                 # it finished just now: take its result
                    raise TimeoutError(f"decoding took longer than {self.timeout:g} s; decoder abandoned") from None

    def _abandon(self, task: _Task) -> bool:
        with self._lock:
            if task.finished:
                return False
            task.abandoned = True
            self.abandoned += 1
        self.budget.release(task.cost)      # its memory is no longer counted: see the module docstring
        self._spawn()
        return True

    def close(self, join_timeout: float = 2.0):
        """Stop the workers; wait (up to `join_timeout` s in all) for those not abandoned, so none
        is still inside a decoder when the interpreter shuts down."""
        self._closed = True
        for _ in range(self._workers):
            self._q.put(None)
        deadline = time.monotonic() + join_timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
