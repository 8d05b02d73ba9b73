"""fp32 ONNX export with a dynamic batch axis and an optional feature-map output (for CAM).

The graph is written without constant folding and with BatchNorm preserved (TorchScript
exporter, TrainingMode.PRESERVE on an eval-mode model): every state_dict tensor stays an
initializer under its own name, so the torch reference reads its weights from this one file.
OpenVINO, ONNX Runtime and TensorRT fold BatchNorm into the convolutions at load time, so this
costs no speed (measured in bench/)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from cxr_edge.architectures import CXRNet, WithFeatures

OPSET = 18


class _LogitsOnly(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def export_onnx(net: CXRNet, input_shape: tuple, path, features: bool = True) -> Path:
    path = Path(path)
    net = net.eval().float().cpu()
    wrapper = WithFeatures(net) if features else _LogitsOnly(net)
    outputs = ["logits", "features"] if features else ["logits"]
    x = torch.zeros((1,) + tuple(input_shape), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (x,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ["input"] + outputs},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    # Deterministic bytes: the exporter stamps its own version; keep the graph as the only content.
    model.producer_version = ""
    onnx.save(model, str(path))
    return path


def run_onnx(path, batch: np.ndarray) -> np.ndarray:
    """Logits from ONNX Runtime: the 'it really runs' check after export."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": batch.astype(np.float32)})[0]
