"""INT8 post-training quantization with NNCF on real images -> an explicit Q/DQ ONNX file that
OpenVINO, ONNX Runtime and TensorRT all run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx


def _dataset(tensors: np.ndarray, batch: int = 1):
    import nncf
    items = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]
    return nncf.Dataset(items, lambda x: {"input": x.astype(np.float32)})


def quantize_ptq(fp32_path, out_path, calib: np.ndarray, ignored: list | None = None, preset: str = "mixed") -> Path:
    import nncf
    model = onnx.load(str(fp32_path))
    kwargs = {}
    if ignored:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=list(ignored), validate=False)
    q = nncf.quantize(model, _dataset(calib), subset_size=len(calib),
                      preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
                      **kwargs)
    q.producer_version = ""
    onnx.save(q, str(out_path))
    return Path(out_path)


def quantize_accuracy_control(fp32_path, out_path, calib: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                              max_drop: float) -> Path:
    """NNCF's quantize_with_accuracy_control: reverts the most harmful quantizers to float until
    the accuracy drop on the labelled validation set is within max_drop (absolute, fraction)."""
    import nncf
    import onnxruntime as ort

    def validate(model: onnx.ModelProto, dataset) -> float:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        correct = n = 0
        for x, y in dataset:
            logits = sess.run(None, {"input": x.astype(np.float32)})[0]
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        return correct / max(1, n)

    val_items = [(val_x[i:i + 8], val_y[i:i + 8]) for i in range(0, len(val_x), 8)]
    val_ds = nncf.Dataset(val_items, lambda item: {"input": item[0].astype(np.float32)})
    # validation_fn receives the raw items back through get_data()
    val_ds_raw = nncf.Dataset(val_items)
    model = onnx.load(str(fp32_path))
    q = nncf.quantize_with_accuracy_control(model, _dataset(calib), val_ds_raw, validate, max_drop=max_drop,
                                            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))
    q.producer_version = ""
    onnx.save(q, str(out_path))
    return Path(out_path)


def quantized_node_names(path) -> list[str]:
    """Names of the compute nodes fed by a DequantizeLinear (what the ignored scope would name)."""
    m = onnx.load(str(path))
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in dq_out for i in n.input)]
