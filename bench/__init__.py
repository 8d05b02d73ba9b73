"""bench/: every backend and precision of a model package, side by side: size, load time, throughput,
latency, end-to-end speed on real files, memory, and parity with the torch fp32 reference.

    cxr-edge bench --quick --out bench-out/
    from cxr_edge.bench import run_bench; report = run_bench(quick=True, out="bench-out")
"""
from __future__ import annotations


def run_bench(*args, **kwargs):
    """See `cxr_edge.bench.core.run_bench`."""
    from .core import run_bench as _run
    return _run(*args, **kwargs)


__all__ = ["run_bench"]
