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
    import tensorrt as trt
    name, cc = _gpu()
    raw = f"{onnx_sha256}|{name}|sm{cc}|trt{trt.__version__}|{precision}|maxbatch{MAX_BATCH}"
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


def cache_dir() -> Path:
    d = Path(os.environ.get("CXR_EDGE_CACHE", Path.home() / ".cache" / "cxr-edge")) / "tensorrt"
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


@register
class TensorRTBackend(Backend):
    name = "tensorrt"
    precisions = ("fp32", "fp16", "int8")
    devices = ("cuda",)

    @classmethod
    def available(cls):
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
        import tensorrt as trt
        import torch  # CUDA buffers and streams: torch is the simplest dependable allocator here
        self.torch = torch
        spec = package.preprocess
        shape = (spec.channels, spec.size, spec.size)
        key = engine_cache_key(artifact.sha256, precision)
        path = cache_dir() / f"{key}.engine"
        if not path.is_file():
            engine = build_engine(self.artifact_path, precision, shape,
                                  timing_cache=cache_dir() / "timing.cache")
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(engine)
            os.replace(tmp, path)
        self.engine_path = path
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize cached engine {path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in self.names if n != self.input_name]
        self.stream = torch.cuda.Stream()
        self.device = "cuda"
        import threading
        self._lock = threading.Lock()  # one execution context: serialise callers

    def infer(self, batch, features=False):
        torch = self.torch
        outs = {}
        with self._lock, torch.cuda.stream(self.stream):
            for start in range(0, len(batch), MAX_BATCH):
                chunk = batch[start:start + MAX_BATCH]
                x = torch.from_numpy(np.ascontiguousarray(chunk, np.float32)).cuda(non_blocking=True)
                self.context.set_input_shape(self.input_name, tuple(x.shape))
                self.context.set_tensor_address(self.input_name, x.data_ptr())
                bufs = {}
                for n in self.output_names:
                    shp = tuple(self.context.get_tensor_shape(n))
                    bufs[n] = torch.empty(shp, dtype=torch.float32, device="cuda")
                    self.context.set_tensor_address(n, bufs[n].data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise BackendError("TensorRT execute_async_v3 failed")
                self.stream.synchronize()
                for n, t in bufs.items():
                    if n == "logits" or (features and n == "features"):
                        outs.setdefault(n, []).append(t.cpu().numpy())
        return {n: np.concatenate(v) for n, v in outs.items()}
