"""INT8 quantization with NNCF on real images -> an explicit Q/DQ ONNX file that OpenVINO, ONNX
Runtime and TensorRT all run.

One entry point, `quantize(fp32_path, out_path, calib, settings, control=None)`, covers every method
export offers; `QuantSettings` names the knobs and `QuantSettings.describe()` is what the package
records in the int8 artifact's `extra`, so a package says exactly how its INT8 was made:

- post-training quantization (`nncf.quantize`), preset mixed (symmetric weights, asymmetric
  activations) or performance, fast bias correction or full bias correction;
- an ignored scope: named layers stay in float (`sensitive_layers()` gives the stem convolution and the
  classifier);
- accuracy-aware quantization (`nncf.quantize_with_accuracy_control`) driven by the export gate's
  own metric: the share of control images whose top-1 class equals the torch fp32 reference's AND
  whose max |Δp| stays within `dp_tol`. NNCF reverts the quantizers that hurt that metric most until
  it drops by at most `max_drop` (absolute) from the fp32 model's value (1.0).
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx


@dataclass
class QuantSettings:
    """How to quantize. Fields are recorded verbatim in the artifact's `extra`."""
    preset: str = "mixed"                 # "mixed" | "performance" (NNCF QuantizationPreset)
    fast_bias_correction: bool = True     # False: NNCF's full BiasCorrection (slower, layer by layer)
    ignored: list = field(default_factory=list)   # ONNX node names kept in float
    max_drop: float | None = None         # set: accuracy control with this absolute drop of the gate metric
    dp_tol: float = 0.05                  # |Δp| tolerance inside the accuracy-control metric
    max_iterations: int | None = None     # accuracy control: at most this many quantizer reverts
    ranking_subset: int | None = None     # accuracy control: images used to rank quantizers (NNCF default 300)

    def method(self) -> str:
        if self.max_drop is not None:
            return "nncf.quantize_with_accuracy_control"
        return "nncf.quantize (PTQ)"

    def describe(self) -> dict:
        d = {"method": self.method(), **{k: v for k, v in asdict(self).items() if v not in (None, [], ())}}
        if self.max_drop is None:
            d.pop("dp_tol", None)
        else:
            d["control_metric"] = (f"share of control images with top-1 == torch fp32 and max |dp| <= {self.dp_tol}")
        return d


def _dataset(tensors: np.ndarray, batch: int = 1):
    import nncf
    items = [tensors[i:i + batch] for i in range(0, len(tensors), batch)]
    return nncf.Dataset(items, lambda x: {"input": x.astype(np.float32)})


def sensitive_layers(fp32_path) -> list[str]:
    """The stem convolution (first Conv) and every Gemm/MatMul classifier node of an ONNX graph."""
    nodes = onnx.load(str(fp32_path), load_external_data=False).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    heads = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")]
    return ([convs[0]] if convs else []) + heads


def gate_metric(ref_probs: np.ndarray, probs: np.ndarray, dp_tol: float) -> np.ndarray:
    """(N,) float: 1.0 where the candidate's top-1 equals the reference's and max |Δp| <= dp_tol."""
    ok = (ref_probs.argmax(1) == probs.argmax(1)) & (np.abs(ref_probs - probs).max(1) <= dp_tol)
    return ok.astype(np.float64)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _openvino_probs(model: onnx.ModelProto, x: np.ndarray, batch: int = 16) -> np.ndarray:
    """Run an in-memory ONNX model with OpenVINO on CPU at f32 -> (N, classes) probabilities."""
    import openvino as ov
    with tempfile.TemporaryDirectory(prefix="cxr-q-") as d:
        p = Path(d) / "m.onnx"
        onnx.save(model, str(p))
        c = ov.Core().compile_model(str(p), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = c.output("logits") if any("logits" in o.get_names() for o in c.outputs) else c.output(0)
    return _softmax(np.concatenate([c(x[i:i + batch])[out] for i in range(0, len(x), batch)]))


def quantize(fp32_path, out_path, calib: np.ndarray, settings: QuantSettings | None = None,
             control: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Quantize the fp32 ONNX at `fp32_path` to a Q/DQ ONNX at `out_path`.

    calib: (N, C, H, W) float32 preprocessed calibration images (all are used).
    control: (x, ref_probs) for accuracy control — (M, C, H, W) float32 images and the torch fp32
    reference probabilities (M, classes) on them; required when settings.max_drop is set.
    Returns the `extra` record ({"method", settings..., "calibration_images", ...}).
    Raises ValueError for an empty calibration set or accuracy control without control images."""
    import nncf
    s = settings or QuantSettings()
    if calib is None or len(calib) == 0:
        raise ValueError("int8 quantization needs at least one calibration image")
    model = onnx.load(str(fp32_path))
    common = dict(preset=nncf.QuantizationPreset.MIXED if s.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
                  subset_size=len(calib), fast_bias_correction=s.fast_bias_correction)
    if s.ignored:
        common["ignored_scope"] = nncf.IgnoredScope(names=list(s.ignored), validate=False)
    extra = s.describe()
    extra["calibration_images"] = int(len(calib))
    if s.max_drop is None:
        q = nncf.quantize(model, _dataset(calib), **common)
    else:
        if control is None:
            raise ValueError("accuracy-controlled quantization needs control images and their reference probabilities")
        cx, cref = control
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        def validate(m: onnx.ModelProto, items) -> tuple[float, list[float]]:
            # items: control-image indices (NNCF may pass a ranking subset); one batched run
            idx = np.asarray(list(items), int)
            per = gate_metric(cref[idx], _openvino_probs(m, cx[idx]), s.dp_tol)
            return float(per.mean()), per.tolist()

        restorer = AdvancedAccuracyRestorerParameters(
            **({"max_num_iterations": int(s.max_iterations)} if s.max_iterations else {}),
            **({"ranking_subset_size": int(s.ranking_subset)} if s.ranking_subset else {}))
        val_ds = nncf.Dataset(list(range(len(cx))), lambda i: {"input": cx[i:i + 1].astype(np.float32)})
        q = nncf.quantize_with_accuracy_control(model, _dataset(calib), val_ds, validate, max_drop=s.max_drop,
                                                drop_type=nncf.DropType.ABSOLUTE,
                                                advanced_accuracy_restorer_parameters=restorer, **common)
        extra["control_images"] = int(len(cx))
        extra["reverted_to_float"] = sorted(set(quantized_node_names_from(model_fp32=model, model_q=q, inverse=True)))
    q.producer_version = ""
    onnx.save(q, str(out_path))
    return extra


def quantized_node_names(path) -> list[str]:
    """Names of the compute nodes fed by a DequantizeLinear (what the ignored scope would name)."""
    m = onnx.load(str(path))
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in dq_out for i in n.input)]


def quantized_node_names_from(model_fp32: onnx.ModelProto, model_q: onnx.ModelProto, inverse: bool = False) -> list[str]:
    """Compute nodes of model_q fed by a DequantizeLinear; inverse=True: the fp32 graph's compute
    nodes that are NOT (left in float)."""
    dq_out = {o for n in model_q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q = {n.name for n in model_q.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in dq_out for i in n.input)}
    if not inverse:
        return sorted(q)
    return [n.name for n in model_fp32.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in q]


# -- the previous entry points, kept for callers ---------------------------------------------------
def quantize_ptq(fp32_path, out_path, calib: np.ndarray, ignored: list | None = None, preset: str = "mixed") -> Path:
    quantize(fp32_path, out_path, calib, QuantSettings(preset=preset, ignored=list(ignored or [])))
    return Path(out_path)
