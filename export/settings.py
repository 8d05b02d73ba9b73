"""What `export_checkpoint` builds and how it gates it, as one settings object.

`ExportSettings` holds the package-wide choices and three groups: `GateSettings` (the labelled
parity set every artifact is gated on), `Int8Settings` (calibration set, `QuantSettings`, accuracy
control images) and `ReferenceSettings` (the package's reference set). The defaults are those of
`cxr-edge export`. Image sets are given as a DIR, RUN/split.json[:part[+part]] (str), a list of
Sample-like items (.path, .label, optional .source) or a preloaded `cxr_edge.labelled.LabelledSet`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .quantize import QuantSettings


@dataclass
class GateSettings:
    """The labelled parity set: every artifact is measured against the torch fp32 reference on it
    and gated (formats.TOLERANCES)."""
    val: object = None                  # required; a str is read with split part "test" by default
    val_limit: int | None = None        # at most this many parity images (None: all)
    keep_failed: bool = False           # keep artifacts that fail their gate (marked failed), do not raise


@dataclass
class Int8Settings:
    """How the INT8 artifact is calibrated and quantized (used when "int8" is among the precisions)."""
    calib: object = None                # required for int8; a str is read with split part "train" by default
    calib_size: int = 300               # calibration images drawn from `calib`
    calib_by_source: bool = False       # an equal share per data source instead of a plain random draw
    quant: QuantSettings = field(default_factory=QuantSettings)   # quant.max_drop set: accuracy control
    control: object = None              # accuracy-control images; None: the parity set


@dataclass
class ReferenceSettings:
    """The reference set that travels with the package (export/reference_set.py)."""
    images: object = None               # None: `k` images of the parity set; else a DIR, split spec or list
    k: int = 256                        # reference images kept from the parity set (images=None only)
    variants: bool = False              # each image also as 8 deterministic variants (crops, gamma, ...)


@dataclass
class ExportSettings:
    """Everything `export_checkpoint` needs besides the checkpoint and the output folder.

    precisions: "fp32" (always built) and optionally "int8"; formats: "onnx" plus optionally
    "openvino" (IR) and "tensorrt" (engines for the precisions); features: add the feature-map
    output for CAM; name: the package name (default: the checkpoint's experiment, else its file
    stem); provenance: entries copied into model.json's provenance."""
    precisions: tuple = ("fp32", "int8")
    formats: tuple = ("onnx",)
    features: bool = True
    name: str | None = None
    provenance: dict = field(default_factory=dict)
    gate: GateSettings = field(default_factory=GateSettings)
    int8: Int8Settings = field(default_factory=Int8Settings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
