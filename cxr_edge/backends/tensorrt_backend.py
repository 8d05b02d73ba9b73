"""TensorRT (10+) backend. Engines are built from the package's ONNX on first use, on the target,
and cached keyed by GPU name + compute capability + TensorRT version + precision (engines are not
portable across any of those). Export's `build_engine` is this module's function: one builder."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .base import Backend, BackendError, register

MAX_BATCH = 32


def _gpu():
    """(name, 'major.minor') of GPU 0, or raise."""
    from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    err, props = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise RuntimeError(f"cudaGetDeviceProperties failed: {err}")
    return props.name.decode(errors="replace").strip("\x00"), f"{props.major}.{props.minor}"


def engine_cache_key(onnx_sha256: str, precision: str) -> str:
    """24-hex-digit key of a TensorRT engine built from this ONNX (by its sha256) at `precision`.

    Engines are not portable, so the key covers GPU 0's name and compute capability, the TensorRT
    version, the precision and MAX_BATCH. Raises RuntimeError when GPU 0 cannot be queried.
    """
    import tensorrt as trt
    name, cc = _gpu()
    raw = f"{onnx_sha256}|{name}|sm{cc}|trt{trt.__version__}|{precision}|maxbatch{MAX_BATCH}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_dir() -> Path:
    """Engine cache: <verify.cache_root()>/tensorrt (created)."""
    from ..verify import cache_root
    d = cache_root() / "tensorrt"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_engine(onnx_path: os.PathLike, precision: str, input_shape: tuple, max_batch: int = MAX_BATCH,
                 timing_cache: os.PathLike | None = None) -> bytes:
    """Serialized engine for an ONNX file. fp16: builder flag on an fp32 graph; int8: the graph's
    own Q/DQ nodes (explicit quantization; no implicit calibrator)."""
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # Q/DQ scales come from the graph
        config.set_flag(trt.BuilderFlag.FP16)  # layers left in float may use fp16
    tc_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        tc_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(tc_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    c, h, w = input_shape
    inp = network.get_input(0)
    profile.set_shape(inp.name, (1, c, h, w), (8, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT engine build failed for {onnx_path} at {precision}")
    if timing_cache:
        Path(timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _check(ret, what: str):
    """cuda-python calls return (cudaError_t, *values): raise BackendError on an error, return the values."""
    from cuda.bindings import runtime as cudart
    err, rest = ret[0], ret[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        raise BackendError(f"CUDA {what} failed: {err.name if hasattr(err, 'name') else err} "
                           f"({msg.decode(errors='replace') if isinstance(msg, bytes) else msg})")
    return rest[0] if len(rest) == 1 else rest


class _Slot:
    """One request in flight: an execution context, a CUDA stream and event, device buffers for the
    largest batch, and page-locked host buffers the copies go through."""

    def __init__(self, engine, input_name, output_names, shape, max_batch):
        import ctypes

        from cuda.bindings import runtime as cudart
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError("TensorRT could not create an execution context (GPU memory?)")
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")
        self.event = _check(cudart.cudaEventCreateWithFlags(cudart.cudaEventDisableTiming), "cudaEventCreate")
        self.input_name, self.output_names = input_name, output_names
        self.device, self.host, self.views = {}, {}, {}
        shapes = {input_name: (max_batch,) + tuple(shape)}
        for n in output_names:
            s = tuple(engine.get_tensor_shape(n))
            shapes[n] = (max_batch,) + tuple(max(1, d) for d in s[1:])  # -1 only in the batch axis
        for n, shp in shapes.items():
            count = int(np.prod(shp))
            self.device[n] = _check(cudart.cudaMalloc(4 * count), "cudaMalloc")
            self.host[n] = _check(cudart.cudaMallocHost(4 * count), "cudaMallocHost")
            self.views[n] = np.ctypeslib.as_array(ctypes.cast(self.host[n], ctypes.POINTER(ctypes.c_float)), (count,))
            self.context.set_tensor_address(n, int(self.device[n]))

    def submit(self, chunk: np.ndarray, wanted: list):
        """Queue H2D copy, inference and D2H copies of `chunk` (n <= max batch) on this slot's stream."""
        from cuda.bindings import runtime as cudart
        n = len(chunk)
        flat = np.ascontiguousarray(chunk, np.float32).reshape(-1)
        self.views[self.input_name][:flat.size] = flat
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpyAsync(self.device[self.input_name], self.host[self.input_name], 4 * flat.size, h2d,
                                      self.stream), "cudaMemcpyAsync H2D")
        if not self.context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise BackendError(f"TensorRT rejected input shape {tuple(chunk.shape)}")
        if not self.context.execute_async_v3(int(self.stream)):
            raise BackendError("TensorRT execute_async_v3 failed")
        self.shapes = {}
        for name in wanted:
            shp = tuple(self.context.get_tensor_shape(name))
            self.shapes[name] = shp
            _check(cudart.cudaMemcpyAsync(self.host[name], self.device[name], 4 * int(np.prod(shp)), d2h, self.stream),
                   "cudaMemcpyAsync D2H")
        _check(cudart.cudaEventRecord(self.event, self.stream), "cudaEventRecord")
        self.n = n

    def collect(self) -> dict:
        from cuda.bindings import runtime as cudart
        _check(cudart.cudaEventSynchronize(self.event), "cudaEventSynchronize")
        return {name: self.views[name][:int(np.prod(shp))].reshape(shp).copy() for name, shp in self.shapes.items()}

    def close(self):
        from cuda.bindings import runtime as cudart
        cudart.cudaStreamSynchronize(self.stream)
        for p in self.device.values():
            cudart.cudaFree(p)
        for p in self.host.values():
            cudart.cudaFreeHost(p)
        cudart.cudaEventDestroy(self.event)
        cudart.cudaStreamDestroy(self.stream)
        self.context = None


@register
class TensorRTBackend(Backend):
    """Engines built on the target from the package's ONNX (cached, see engine_cache_key); CUDA
    memory and streams through cuda-python (no torch). Up to `options["requests"]` (default 3)
    batches run concurrently, each on its own execution context and stream."""
    name = "tensorrt"
    supports_async = True

    @classmethod
    def available(cls):
        """(usable here, why): TensorRT >= 10, cuda-python and an NVIDIA GPU; never raises."""
        try:
            import tensorrt as trt
        except ImportError:
            return False, "tensorrt not installed (pip install 'cxr-edge[tensorrt]'; needs an NVIDIA GPU)"
        try:
            name, cc = _gpu()
        except ImportError:
            return False, "cuda-python not installed (pip install cuda-python)"
        except Exception as e:
            return False, f"no usable NVIDIA GPU: {e}"
        if int(trt.__version__.split(".")[0]) < 10:
            return False, f"TensorRT {trt.__version__} is older than 10"
        return True, f"TensorRT {trt.__version__} on {name} (sm {cc})"

    def __init__(self, package, artifact, precision, threads=None, options=None):
        super().__init__(package, artifact, precision, threads, options)
        import queue
        import threading

        import tensorrt as trt
        spec = package.preprocess
        self.shape = (spec.channels, spec.size, spec.size)
        key = engine_cache_key(artifact.sha256, precision)
        path = cache_dir() / f"{key}.engine"
        self.fresh_build = not path.is_file()   # a new engine is verified before use (backends.load_best)
        if self.fresh_build:
            engine = build_engine(self.artifact_path, precision, self.shape,
                                  timing_cache=cache_dir() / "timing.cache")
            from ..verify import atomic_write
            atomic_write(path, engine)
        self.engine_path = path
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize cached engine {path}; delete it to rebuild")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if n != self.input_name]
        self.device = "cuda"
        self.max_requests = max(1, int(self.options.get("requests", 3)))
        self._free: queue.Queue = queue.Queue()
        self._slots: list = []
        self._lock = threading.Lock()
        self._free.put(self._new_slot())

    def _new_slot(self) -> _Slot:
        s = _Slot(self.engine, self.input_name, self.output_names, self.shape, MAX_BATCH)
        self._slots.append(s)
        return s

    def _take(self) -> _Slot:
        import queue
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if len(self._slots) < self.max_requests:
                return self._new_slot()
        return self._free.get()  # every slot busy: wait for a caller's result() to return one

    def infer(self, batch, features=False):
        """(N, C, H, W) float32 -> {'logits': (N, K)} (and 'features' when asked); waits."""
        return self.infer_async(batch, features).result()

    def infer_async(self, batch, features=False):
        """Start one batch on a free execution context/stream; returns a handle whose .result() waits.

        Batches over MAX_BATCH run now in MAX_BATCH chunks, one after another, and return a ready handle.
        """
        wanted = [n for n in self.output_names if n == "logits" or (features and n == "features")]
        if len(batch) > MAX_BATCH:  # larger than the engine's profile: chunks, one after another
            parts = [self.infer(batch[i:i + MAX_BATCH], features) for i in range(0, len(batch), MAX_BATCH)]
            out = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
            return _Ready(out)
        slot = self._take()
        try:
            slot.submit(batch, wanted)
        except Exception:
            self._free.put(slot)
            raise
        return _Pending(self, slot)

    def close(self):
        """Synchronize and free every context's CUDA memory, event and stream."""
        for s in self._slots:
            s.close()
        self._slots = []


class _Ready:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


class _Pending:
    """Handle of a batch in flight; result() waits for its CUDA event and returns the slot."""

    def __init__(self, backend, slot):
        self.backend, self.slot, self._value = backend, slot, None

    def result(self):
        if self._value is None:
            try:
                self._value = self.slot.collect()
            finally:
                self.backend._free.put(self.slot)
        return self._value
