"""The PyTorch reference backend (fp32, eager). Needs the workbench install (torch + torchvision).

Its weights are the package's fp32 ONNX initializers (or a safetensors artifact listed in
model.json): see cxr_edge.weights. The network comes from cxr_edge.architectures, the registry
train/ uses too.
"""
from __future__ import annotations

import numpy as np

from .base import Backend, BackendError, nvidia_gpu_present, register

def reference_state_dict(package) -> dict:
    """{key: torch.Tensor} of the package's fp32 reference weights (see cxr_edge.weights)."""
    import torch
    from ..weights import WeightsUnavailable, read_weights
    try:
        return {k: torch.from_numpy(v) for k, v in read_weights(package).items()}
    except WeightsUnavailable as e:
        raise BackendError(str(e)) from None


def reference_network(package):
    """The package's architecture (cxr_edge.architectures) with its fp32 reference weights loaded,
    in train mode as built (callers choose eval/device).

    Raises:
        BackendError: no weights to read, or they do not fit the architecture.
    """
    from ..architectures import build
    net = build(package.architecture)
    missing, unexpected = net.load_state_dict(reference_state_dict(package), strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise BackendError(f"{package.root}: reference weights do not fit {package.architecture.get('name')} "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net


@register
class TorchBackend(Backend):
    """The PyTorch reference: the package architecture with its fp32 weights, at fp32 (CPU or CUDA) or fp16/bf16 (CUDA).

    Options: device ("cuda" runs fp32 on the GPU; default "cpu"). fp16/bf16 always run on CUDA.

    Raises:
        BackendError: no architecture in model.json, the weights do not fit it, or CUDA is missing.
    """
    name = "torch"
    _DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

    @classmethod
    def available(cls):
        """(usable here, why): torch and torchvision are installed, checked without importing torch."""
        # Without importing torch: importing it costs seconds and ~400 MB, and auto usually
        # picks another backend.
        import importlib.metadata
        import importlib.util
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
            return False, "torch/torchvision not installed (the workbench: pip install 'cxr-edge[workbench]')"
        return True, f"torch {importlib.metadata.version('torch')}"

    @classmethod
    def supports(cls, precision, options=None):
        """fp32 on the CPU; fp16/bf16 (and fp32 with options device "cuda") on a CUDA GPU only (bf16 from
        compute capability 8.0)."""
        ok, why = super().supports(precision, options)
        if not ok or cls.target_device(precision, options) == "cpu":
            return ok, why
        if not nvidia_gpu_present():
            return False, f"torch {precision} needs an NVIDIA GPU (CUDA); none here"
        try:
            import torch
            if not torch.cuda.is_available():
                return False, f"torch {precision} needs CUDA; torch.cuda.is_available() is False"
            if precision == "bf16" and not torch.cuda.is_bf16_supported():
                return False, f"torch bf16: {torch.cuda.get_device_name(0)} has no native bf16"
        except Exception as e:
            return False, f"torch {precision}: CUDA unusable: {e}"
        return True, ""

    @classmethod
    def target_device(cls, precision, options=None):
        """fp16/bf16: cuda; fp32: options["device"] ("cpu" by default: the reference)."""
        if precision != "fp32":
            return "cuda"
        return "cuda" if (options or {}).get("device") == "cuda" else "cpu"

    def __init__(self, package, artifact, precision, threads=None, options=None):
        super().__init__(package, artifact, precision, threads, options)
        import torch
        if not package.architecture:
            raise BackendError(f"{package.root}: model.json has no 'architecture'; the torch reference cannot be built")
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        net = reference_network(package)
        self.device = self.target_device(precision, self.options)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"torch {precision} on cuda: torch.cuda.is_available() is False")
        self.dtype = getattr(torch, self._DTYPES[precision])
        self.net = net.eval().to(self.device, self.dtype)

    def infer(self, batch, features=False):
        """(N, C, H, W) float32 -> {'logits': (N, K)} float32, plus 'features' (N, C, h, w) when asked."""
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device, self.dtype, non_blocking=True)
            logits, fmap = self.net.forward_with_features(x)
            out = {"logits": logits.float().cpu().numpy()}
            if features:
                out["features"] = fmap.float().cpu().numpy()
        return out
