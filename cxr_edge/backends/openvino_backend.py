from __future__ import annotations

import functools
import os
import queue

import numpy as np

from .base import Backend, BackendError, register

# OpenVINO's CPU plugin silently runs bf16 on CPUs with AMX/AVX512-BF16 unless told otherwise:
# the precision a user asks for is set explicitly, always.
_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


@register
class OpenVINOBackend(Backend):
    """OpenVINO on the CPU: runs the fp32 IR (model.xml + .bin) at fp32, bf16 or fp16, and the int8 artifact at int8.

    The inference precision is always set explicitly (bf16/fp16 only where the CPU has them natively).
    Options: throughput (bool, default True: THROUGHPUT mode, else LATENCY); cache_dir (path: OpenVINO's
    compiled-model cache). Async: a pool of infer requests, grown on demand.

    Raises:
        BackendError: the CPU lacks the precision, or the model cannot be compiled.
    """
    name = "openvino"
    supports_async = True

    @classmethod
    def available(cls):
        """(usable here, why): openvino imports and has a CPU device; never raises."""
        try:
            import openvino as ov
        except ImportError:
            return False, "openvino not installed (pip install 'cxr-edge[openvino]')"
        try:
            devices = ov.Core().available_devices
        except Exception as e:
            return False, f"openvino {ov.__version__} cannot enumerate devices: {e}"
        if "CPU" not in devices:
            return False, f"openvino {ov.__version__}: no CPU device ({devices})"
        return True, f"openvino {ov.__version__}, devices {', '.join(devices)}"

    @classmethod
    @functools.lru_cache(maxsize=None)  # a CPU's capabilities do not change while running
    def supported_hints(cls) -> set:
        """Inference-precision hints this CPU runs natively: {"f32"} plus "bf16"/"f16" (cached)."""
        import openvino as ov
        try:
            caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        except Exception:
            return {"f32"}
        hints = {"f32"}
        if "BF16" in caps:
            hints.add("bf16")
        if "FP16" in caps:
            hints.add("f16")
        return hints

    @classmethod
    def supports(cls, precision, options=None):
        """bf16/fp16 need the CPU to report BF16/FP16 in OPTIMIZATION_CAPABILITIES (formats.RUNS
        capability): emulated, they are slower than fp32 and not what the user asked for."""
        ok, why = super().supports(precision, options)
        if not ok:
            return ok, why
        from ..formats import run
        cap = run(cls.name, precision).capability
        if cap is None:
            return True, ""
        hint = run(cls.name, precision).hint
        if hint in cls.supported_hints():
            return True, ""
        return False, f"no native {precision} on this CPU (OpenVINO CPU capabilities lack {cap})"

    def __init__(self, package, artifact, precision, threads=None, options=None):
        super().__init__(package, artifact, precision, threads, options)
        import openvino as ov
        import openvino.properties.hint as hints
        core = ov.Core()
        hint = _HINT[precision]
        if hint not in self.supported_hints():
            raise BackendError(f"openvino: this CPU has no {precision} support "
                               f"(OPTIMIZATION_CAPABILITIES lacks {hint.upper()})")
        config = {
            hints.inference_precision: {"f32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16}[hint],
            hints.performance_mode: hints.PerformanceMode.THROUGHPUT if self.options.get("throughput", True)
            else hints.PerformanceMode.LATENCY,
        }
        if threads:
            import openvino.properties as props
            config[props.inference_num_threads] = int(threads)
        cache_dir = self.options.get("cache_dir")
        if cache_dir:
            import openvino.properties as props
            config[props.cache_dir] = os.fspath(cache_dir)
        try:
            model = core.read_model(os.fspath(self.artifact_path))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as e:
            raise BackendError(f"openvino could not compile {self.artifact.file} at {precision}: {e}") from None
        got = str(self.compiled.get_property(hints.inference_precision)).lower()
        self.effective_precision = got
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self._outputs = {n: self.compiled.output(n) for n in self.output_names}
        self.nireq = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        import queue
        self._free = queue.Queue()
        for _ in range(max(1, self.nireq)):
            self._free.put(self.compiled.create_infer_request())

    def describe(self):
        """Like Backend.describe, with the inference precision OpenVINO actually compiled for."""
        return f"openvino {self.precision} (inference precision {self.effective_precision}) on cpu ({self.artifact.file})"

    def _collect(self, req, features):
        out = {"logits": np.array(req.get_tensor(self._outputs["logits"]).data, copy=True)}
        if features and "features" in self._outputs:
            out["features"] = np.array(req.get_tensor(self._outputs["features"]).data, copy=True)
        return out

    def infer(self, batch, features=False):
        """(N, C, H, W) float32 -> {'logits': (N, K)} (and 'features' when asked and present); waits."""
        return self.infer_async(batch, features).result()

    def infer_async(self, batch, features=False):
        """Start one batch on a free infer request (a new one if none is free); returns a handle.

        The handle's .result() waits and returns what `infer` returns, then frees the request.
        """
        try:
            req = self._free.get_nowait()
        except queue.Empty:
            # Every request is held by a handle not yet collected (this stream's batch in flight, or
            # another thread's): waiting for one would deadlock (nireq is 1 in LATENCY mode, and
            # concurrent callers each hold one). Make another; the pool grows to the callers' need.
            req = self.compiled.create_infer_request()
        try:
            req.start_async({0: np.ascontiguousarray(batch, np.float32)}, share_inputs=False)
        except Exception:
            self._free.put(req)
            raise
        return _Pending(self, req, features)


class _Pending:
    def __init__(self, backend, req, features):
        self.backend, self.req, self.features, self._value = backend, req, features, None

    def result(self):
        if self._value is None:
            try:
                self.req.wait()
                self._value = self.backend._collect(self.req, self.features)
            finally:
                self.backend._free.put(self.req)
        return self._value
