"""Backend registry and the load-time `auto` choice. A new backend is one new module imported here."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..formats import BACKEND_ORDER, PRECISION_ORDER, RUN_PRECISIONS
from . import onnxruntime_backend, openvino_backend, tensorrt_backend, torch_backend  # noqa: F401 (register)
from .base import REGISTRY, Backend, BackendError

log = logging.getLogger("cxr_edge")


@dataclass
class Choice:
    backend: str
    precision: str
    artifact: object      # package Artifact
    reason: str


def backend_status() -> dict[str, tuple[bool, str]]:
    return {name: REGISTRY[name].available() for name in BACKEND_ORDER if name in REGISTRY}


def candidates(package, backend: str, precision: str) -> tuple[list[Choice], list[str]]:
    """Every (backend, precision) the package + machine allow, fastest first, and why others were skipped."""
    status = backend_status()
    names = BACKEND_ORDER if backend == "auto" else (backend,)
    out, skipped = [], []
    for name in names:
        if name not in REGISTRY:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKEND_ORDER)}")
        ok, why = status[name]
        if not ok:
            skipped.append(f"{name}: {why}")
            continue
        precs = PRECISION_ORDER[name] if precision == "auto" else (precision,)
        for prec in precs:
            src = RUN_PRECISIONS[name].get(prec)
            if src is None:
                skipped.append(f"{name} {prec}: not a precision {name} runs")
                continue
            if name == "openvino" and prec in ("bf16", "fp16"):
                hint = {"bf16": "bf16", "fp16": "f16"}[prec]
                if hint not in REGISTRY[name].supported_hints():
                    skipped.append(f"openvino {prec}: this CPU has no native {prec}")
                    continue
            art = package.artifact(src, "onnx-qdq" if src == "int8" else "onnx")
            if art is None:
                skipped.append(f"{name} {prec}: package has no {src} artifact")
                continue
            if name != "torch" and not art.passed_for(name, prec):
                skipped.append(f"{name} {prec}: {art.file} did not pass its parity gate")
                continue
            out.append(Choice(name, prec, art, f"{status[name][1]}; {art.file} "
                                                 + ("is the reference" if name == "torch" else "passed its parity gate")))
    return out, skipped


def choose(package, backend: str = "auto", precision: str = "auto") -> tuple[Choice, list[str]]:
    found, skipped = candidates(package, backend, precision)
    if not found:
        raise BackendError(f"no usable backend for {package.root} (backend={backend}, precision={precision}): "
                           + "; ".join(skipped))
    return found[0], skipped


def open_backend(package, choice: Choice, threads=None, options=None) -> Backend:
    return REGISTRY[choice.backend](package, choice.artifact, choice.precision, threads, options)


def load_best(package, backend="auto", precision="auto", threads=None, options=None) -> tuple[Backend, str]:
    """Open the fastest candidate; if it fails to load (driver, CPU feature), fall back to the next."""
    found, skipped = candidates(package, backend, precision)
    errors = []
    for ch in found:
        try:
            b = open_backend(package, ch, threads, options)
        except Exception as e:  # a backend failing at load must not stop the next from trying
            errors.append(f"{ch.backend} {ch.precision}: failed to load: {e}")
            continue
        why = f"chose {ch.backend} {ch.precision}: {ch.reason}"
        if skipped or errors:
            why += " | skipped: " + "; ".join(skipped + errors)
        log.info(why)
        return b, why
    raise BackendError(f"no usable backend for {package.root} (backend={backend}, precision={precision}): "
                       + "; ".join(skipped + errors))
