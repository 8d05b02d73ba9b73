"""TensorRT engines at export time: built with the runtime's own builder (one code path), into the
runtime's engine cache, then gated like every other artifact. Engines are never shipped in a
package: they are specific to GPU, compute capability and TensorRT version."""
from __future__ import annotations


def build_engines(pkg, precisions, log) -> dict:
    from cxr_edge.backends.tensorrt_backend import TensorRTBackend
    ok, why = TensorRTBackend.available()
    if not ok:
        log(f"tensorrt: skipped ({why})")
        return {"built": False, "reason": why}
    report = {"built": True, "detail": why, "engines": {}}
    for prec in ("fp16", "int8", "fp32"):
        if prec not in precisions and not (prec == "fp16" and "fp32" in precisions):
            continue
        src = "int8" if prec == "int8" else "fp32"
        art = pkg.artifact(src)
        if art is None:
            continue
        import time
        t = time.time()
        b = TensorRTBackend(pkg, art, prec)  # builds and caches on first use
        report["engines"][prec] = {"engine": str(b.engine_path.name), "build_seconds": round(time.time() - t, 1)}
        log(f"tensorrt {prec}: engine {b.engine_path.name} in {time.time() - t:.0f}s")
    return report
