"""What the numbers were measured on: CPU model, cores and relevant ISA flags, GPU, load, versions,
thread settings. Imports no torch (versions come from package metadata)."""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

PACKAGES = ("cxr-edge", "numpy", "pillow", "openvino", "onnxruntime", "torch", "torchvision", "onnx", "nncf",
            "pydicom", "tensorrt", "matplotlib", "psutil")
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
         "amx_int8", "amx_tile")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CXR_EDGE_THREADS")


def _cpuinfo() -> tuple[str, set]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k == "model name" and not model:
                    model = v.strip()
                elif k == "flags" and not flags:
                    flags = set(v.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def _gpus() -> list[dict] | str:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "none found (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except Exception as e:
        return f"nvidia-smi failed: {e}"
    if out.returncode != 0:
        return f"nvidia-smi failed: {(out.stderr or out.stdout).strip()[:200]}"
    gpus = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        gpus.append(dict(zip(("name", "driver", "memory", "compute_capability"), parts)))
    return gpus or "none found"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def host_info(threads=None, decode_workers=None) -> dict:
    model, flags = _cpuinfo()
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
        mem = psutil.virtual_memory().total
    except Exception:
        physical, mem = None, None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        import openvino as ov
        ov_caps = list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:
        ov_caps = None
    return {
        "cpu": {"model": model, "logical_cores": os.cpu_count(), "physical_cores": physical,
                "usable_cores": affinity, "flags": sorted(f for f in FLAGS if f in flags),
                "openvino_capabilities": ov_caps, "machine": platform.machine()},
        "memory_gb": round(mem / 2**30, 1) if mem else None,
        "gpu": _gpus(),
        "os": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "nice": os.nice(0) if hasattr(os, "nice") else None,
        "versions": versions(),
        "threads": {"requested": threads, "decode_workers": decode_workers,
                    "env": {k: os.environ.get(k) for k in THREAD_ENV if os.environ.get(k)}},
        "python_executable": sys.executable,
    }
