"""The package's fp32 reference weights, read as numpy arrays (no torch needed).

One reader for the torch reference backend and for CAM's head weights. The source is, in order:
a `safetensors` artifact listed (and so checksummed) in model.json, else the fp32 ONNX file's
initializers, which export writes without constant folding so every state_dict tensor keeps its
name (`net.<key>`). A file that model.json does not list is never read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ONNX_PREFIX = "net."


class WeightsUnavailable(ValueError):
    """The package holds no listed file to read reference weights from."""


def weights_source(package) -> tuple[Path, str]:
    """(path, kind) of the listed file the reference weights come from; kind is "safetensors" or "onnx".

    Raises:
        WeightsUnavailable: neither a listed safetensors artifact nor an fp32 ONNX artifact exists.
    """
    st = package.artifact("fp32", "safetensors")
    if st is not None:
        return package.path(st), "safetensors"
    art = package.artifact("fp32", "onnx")
    if art is not None:
        return package.path(art), "onnx"
    raise WeightsUnavailable(f"{package.root}: no fp32 ONNX (or listed safetensors) artifact to read weights from")


def read_weights(package, prefix: str = "") -> dict[str, np.ndarray]:
    """{state_dict key: float array} for every key starting with `prefix` ("" = all, "head." = the head).

    Raises:
        WeightsUnavailable: see `weights_source`; ImportError: onnx/safetensors not installed.
    """
    path, kind = weights_source(package)
    if kind == "safetensors":
        from safetensors.numpy import load_file
        return {k: np.asarray(v) for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path), load_external_data=False)
    full = ONNX_PREFIX + prefix
    return {i.name[len(ONNX_PREFIX):]: np.array(numpy_helper.to_array(i), copy=True)
            for i in model.graph.initializer if i.name.startswith(full)}
