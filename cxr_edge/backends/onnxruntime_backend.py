from __future__ import annotations

import os

import numpy as np

from .base import Backend, BackendError, register


@register
class OnnxRuntimeBackend(Backend):
    """ONNX Runtime: runs the fp32 ONNX at fp32 and the int8 Q/DQ ONNX at int8, on CUDA or the CPU.

    Options: device ("cpu" forces the CPU; otherwise the CUDA provider is used when ONNX Runtime has it).

    Raises:
        BackendError: the session cannot be created for the artifact.
    """
    name = "onnxruntime"

    @classmethod
    def target_device(cls, precision, options=None):
        """cuda when ONNX Runtime has its CUDA provider and options do not ask for the CPU."""
        if (options or {}).get("device", "auto") == "cpu":
            return "cpu"
        try:
            import onnxruntime as ort
            return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
        except ImportError:
            return "cpu"

    @classmethod
    def available(cls):
        """(usable here, why): onnxruntime imports; the message lists its providers."""
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime not installed (pip install 'cxr-edge[onnxruntime]')"
        return True, f"onnxruntime {ort.__version__}, providers {', '.join(ort.get_available_providers())}"

    def __init__(self, package, artifact, precision, threads=None, options=None):
        super().__init__(package, artifact, precision, threads, options)
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and self.options.get("device", "auto") != "cpu":
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(os.fspath(self.artifact_path), so, providers=providers)
        except Exception as e:
            raise BackendError(f"onnxruntime could not load {self.artifact.file}: {e}") from None
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch, features=False):
        """(N, C, H, W) float32 -> {'logits': (N, K)}, plus 'features' when asked and the model has it."""
        wanted = [n for n in self.output_names if n == "logits" or (features and n == "features")]
        outs = self.session.run(wanted, {self.input_name: np.ascontiguousarray(batch, np.float32)})
        return dict(zip(wanted, outs))
