from __future__ import annotations

import functools
import os
import queue
import threading

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
    compiled-model cache). Async: a pool of infer requests, grown on demand. A lone input
    (`infer_one_async`, used by predict_one) runs on a LATENCY compilation of the same artifact
    either way, made on first use (in THROUGHPUT mode: a second compiled model in memory).

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
        hint = _HINT[precision]
        if hint not in self.supported_hints():
            raise BackendError(f"openvino: this CPU has no {precision} support "
                               f"(OPTIMIZATION_CAPABILITIES lacks {hint.upper()})")
        throughput = bool(self.options.get("throughput", True))
        self._config = {
            hints.inference_precision: {"f32": ov.Type.f32, "bf16": ov.Type.bf16, "f16": ov.Type.f16}[hint],
            hints.performance_mode: hints.PerformanceMode.THROUGHPUT if throughput
            else hints.PerformanceMode.LATENCY,
        }
        if threads:
            import openvino.properties as props
            self._config[props.inference_num_threads] = int(threads)
        cache_dir = self.options.get("cache_dir")
        if cache_dir:
            import openvino.properties as props
            self._config[props.cache_dir] = os.fspath(cache_dir)
        self._engine = _Engine(self, self._config)
        self.effective_precision = self._engine.compiled.get_property(hints.inference_precision).get_type_name()
        self.output_names = list(self._engine.outputs)
        self._latency_engine = None if throughput else self._engine
        self._latency_lock = threading.Lock()

    def describe(self):
        """Like Backend.describe, with the inference precision OpenVINO actually compiled for."""
        return f"openvino {self.precision} (inference precision {self.effective_precision}) on cpu ({self.artifact.file})"

    def infer(self, batch, features=False):
        """(N, C, H, W) float32 -> {'logits': (N, K)} (and 'features' when asked and present); waits."""
        return self.infer_async(batch, features).result()

    def infer_async(self, batch, features=False):
        """Start one batch on a free infer request (a new one if none is free); returns a handle.

        The handle's .result() waits and returns what `infer` returns, then frees the request.
        """
        return self._live(self._engine).start(batch, features)

    def infer_one_async(self, batch, features=False):
        """One input, lowest latency: the same artifact and inference precision compiled a second time
        with the LATENCY hint (one stream over every core; compiled on first use), because THROUGHPUT
        mode runs one request on one stream, i.e. one core. Measured on the default package's int8 at
        batch 1, 2 cores: 17-19 ms against 26-29 ms. Outputs equal the throughput engine's (tested)."""
        if self._latency_engine is None:
            import openvino.properties.hint as hints
            with self._latency_lock:
                if self._latency_engine is None:
                    self._latency_engine = _Engine(self, {**self._live(self._config),
                                                          hints.performance_mode: hints.PerformanceMode.LATENCY})
        return self._live(self._latency_engine).start(batch, features)

    def close(self):
        """Release both compiled models and their infer requests; inference afterwards raises BackendError."""
        with self._latency_lock:
            self._engine = self._latency_engine = self._config = None

    def _live(self, part):
        if part is None:
            raise BackendError(f"{self.describe()}: the backend is closed")
        return part


class _Engine:
    """One compiled model and its pool of infer requests, grown on demand."""

    def __init__(self, backend, config: dict):
        import openvino as ov
        core = ov.Core()
        try:
            self.compiled = core.compile_model(core.read_model(os.fspath(backend.artifact_path)), "CPU", config)
        except Exception as e:
            raise BackendError(f"openvino could not compile {backend.artifact.file} at {backend.precision}: "
                               f"{e}") from None
        self.outputs = {o.get_any_name(): o for o in self.compiled.outputs}
        self._free = queue.Queue()
        for _ in range(max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))):
            self._free.put(self.compiled.create_infer_request())

    def start(self, batch, features: bool):
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

    def collect(self, req, features: bool) -> dict:
        out = {"logits": np.array(req.get_tensor(self.outputs["logits"]).data, copy=True)}
        if features and "features" in self.outputs:
            out["features"] = np.array(req.get_tensor(self.outputs["features"]).data, copy=True)
        return out

    def release(self, req) -> None:
        self._free.put(req)


class _Pending:
    def __init__(self, backend, req, features):
        self.backend, self.req, self.features, self._value = backend, req, features, None

    def result(self):
        if self._value is None:
            try:
                self.req.wait()
                self._value = self.backend.collect(self.req, self.features)
            finally:
                self.backend.release(self.req)
        return self._value
