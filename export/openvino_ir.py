"""OpenVINO IR (model.xml/.bin) from the fp32 ONNX: weights kept in f32 (compress_to_fp16=False),
so the IR is the same model; the inference precision is chosen at load time, explicitly."""
from __future__ import annotations

from pathlib import Path


def export_ir(onnx_path, out_dir) -> Path:
    import openvino as ov
    model = ov.convert_model(str(onnx_path))
    xml = Path(out_dir) / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml
