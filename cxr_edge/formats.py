"""The one table of artifact formats and precisions.

export/ decides what to write from it, the runtime decides what each backend may run from it,
bench/ decides which combinations to measure from it. Adding a format or precision is a row here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Format:
    name: str            # artifact format recorded in model.json
    precision: str       # weights precision of the artifact file itself
    suffix: str          # file name in the package
    backends: tuple      # backends able to run this artifact
    devices: tuple


@dataclass(frozen=True)
class Tolerance:
    """Parity gate for one precision, against the torch fp32 reference on the same tensors."""
    min_agreement: float                 # top-1 agreement, fraction
    max_abs_dp: float | None = None      # max |Δp| over all images and classes
    max_accuracy_drop: float | None = None       # fraction (0.005 = 0.5 pp)
    max_disease_recall_drop: float | None = None  # fraction, for every class but the normal one


FORMATS = (
    Format("onnx", "fp32", "model.onnx", ("tensorrt", "openvino", "onnxruntime", "torch"), ("cpu", "cuda")),
    Format("onnx-qdq", "int8", "model.int8.onnx", ("tensorrt", "openvino", "onnxruntime"), ("cpu", "cuda")),
    Format("openvino-ir", "fp32", "model.xml", ("openvino",), ("cpu", "gpu")),
)

# What a backend computes in, given the artifact. An fp32 artifact can be run at fp16/bf16 by
# backends that convert on load (OpenVINO's inference precision hint, TensorRT's builder flags).
RUN_PRECISIONS = {
    "torch": {"fp32": "fp32"},
    "onnxruntime": {"fp32": "fp32", "int8": "int8"},
    "openvino": {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "int8": "int8"},
    "tensorrt": {"fp32": "fp32", "fp16": "fp32", "int8": "int8"},
}
"""backend -> {run precision: artifact precision it is built from}"""

TOLERANCES = {
    "fp32": Tolerance(min_agreement=1.0, max_abs_dp=1e-4),
    "fp16": Tolerance(min_agreement=0.995),
    "bf16": Tolerance(min_agreement=0.995),
    "int8": Tolerance(min_agreement=0.99, max_accuracy_drop=0.005, max_disease_recall_drop=0.01),
}

# Fastest first; "auto" walks this order. TensorRT only counts where an NVIDIA GPU is present
# (its available() says so); on CPUs OpenVINO is the fastest runtime we measured.
BACKEND_ORDER = ("tensorrt", "openvino", "onnxruntime", "torch")
# Within one backend, the precision auto prefers (fastest first), provided its artifact passed.
PRECISION_ORDER = {
    "tensorrt": ("int8", "fp16", "fp32"),
    "openvino": ("int8", "bf16", "fp32"),
    "onnxruntime": ("fp32", "int8"),  # measured: ORT's CPU int8 Q/DQ is slower than its fp32
    "torch": ("fp32",),
}


def artifact_format(precision: str) -> Format:
    """The artifact format whose file a given artifact precision lives in."""
    for f in FORMATS:
        if f.precision == precision and f.name != "openvino-ir":
            return f
    raise KeyError(f"no artifact format for precision {precision!r}")
