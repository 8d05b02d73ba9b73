"""The PyTorch reference backend (fp32, eager). Needs the workbench install (torch + torchvision).

Its weights are the package's fp32 ONNX initializers: export writes that graph without constant
folding and with BatchNorm preserved, so every state_dict tensor sits there under its own name
(`net.<key>`) and the package carries one copy of the weights. A `model.safetensors` in the
package, when present, takes precedence.
"""
from __future__ import annotations

import numpy as np

from .base import Backend, BackendError, register

ONNX_PREFIX = "net."


def reference_state_dict(package) -> dict:
    import torch
    st = package.root / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file
        return load_file(str(st))
    art = package.artifact("fp32", "onnx")
    if art is None:
        raise BackendError(f"{package.root}: no fp32 ONNX artifact to read reference weights from")
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(package.path(art)))
    return {i.name[len(ONNX_PREFIX):]: torch.from_numpy(numpy_helper.to_array(i).copy())
            for i in model.graph.initializer if i.name.startswith(ONNX_PREFIX)}


@register
class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32",)
    devices = ("cpu", "cuda")

    @classmethod
    def available(cls):
        # Without importing torch: importing it costs seconds and ~400 MB, and auto usually
        # picks another backend.
        import importlib.metadata
        import importlib.util
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
            return False, "torch/torchvision not installed (the workbench: pip install 'cxr-edge[workbench]')"
        return True, f"torch {importlib.metadata.version('torch')}"

    def __init__(self, package, artifact, precision, threads=None, options=None):
        super().__init__(package, artifact, precision, threads, options)
        import torch
        from ..train_bridge import build_network
        if not package.architecture:
            raise BackendError(f"{package.root}: model.json has no 'architecture'; the torch reference cannot be built")
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        net = build_network(package.architecture)
        state = reference_state_dict(package)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise BackendError(f"{package.root}: reference weights do not fit {package.architecture.get('name')} "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        want = self.options.get("device", "cpu")
        self.device = "cuda" if want == "cuda" and torch.cuda.is_available() else "cpu"
        self.net = net.eval().to(self.device)

    def infer(self, batch, features=False):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.device)
            logits, fmap = self.net.forward_with_features(x)
            out = {"logits": logits.float().cpu().numpy()}
            if features:
                out["features"] = fmap.float().cpu().numpy()
        return out
