"""checkpoint -> model package: ONNX fp32, INT8 Q/DQ, optional OpenVINO IR and TensorRT engines,
each gated by its measured parity with the torch fp32 reference on real labelled images."""
from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cxr_edge.backends import REGISTRY, precision_support
from cxr_edge.postprocess import softmax
from cxr_edge.formats import RUN_PRECISIONS, artifact_format
from cxr_edge.labelled import LabelledSet, load_images, resolve_set
from cxr_edge.package import Artifact, ModelPackage
from cxr_edge.parity import ParityStats, Verdict, compare, format_table, judge
from cxr_edge.preprocess import PreprocessSpec

from .onnx_export import export_onnx, run_onnx
from cxr_edge.nearties import sources_and_near_ties

from .quantize import QuantSettings, quantize, sensitive_layers
from .settings import ExportSettings, GateSettings, Int8Settings, ReferenceSettings


class GateFailed(Exception):
    def __init__(self, table: str, package: ModelPackage):
        super().__init__("one or more artifacts failed their parity gate:\n" + table)
        self.table, self.package = table, package


def torch_probs(net, tensors: np.ndarray, batch: int = 32) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for i in range(0, len(tensors), batch):
            out.append(net(torch.from_numpy(tensors[i:i + batch])).float().numpy())
    return softmax(np.concatenate(out))


def run_backend(pkg: ModelPackage, art: Artifact, backend: str, precision: str, tensors: np.ndarray,
                batch: int = 16) -> np.ndarray:
    b = REGISTRY[backend](pkg, art, precision)
    try:
        return softmax(np.concatenate([b.infer(tensors[i:i + batch])["logits"] for i in range(0, len(tensors), batch)]))
    finally:
        b.close()


def runnable_combinations(art: Artifact) -> list[tuple[str, str, str]]:
    """(backend, run precision, why-not or '') for every combination the formats table allows."""
    out = []
    for backend, precs in RUN_PRECISIONS.items():
        if backend == "torch":
            continue
        cls = REGISTRY[backend]
        ok, why = cls.available()
        for prec, src in precs.items():
            if src != art.precision:
                continue
            runs, why_not = precision_support(backend, prec) if ok else (False, why)
            out.append((backend, prec, "" if runs else why_not))
    return out


def gate_artifact(pkg, art, ref_probs, data: LabelledSet, log) -> list[tuple[str, ParityStats, Verdict]]:
    """Measure and gate `art` on every combination runnable here; record both in art.parity /
    art.gate (as model.json dicts); return (row name, ParityStats, Verdict) for the measured ones."""
    rows = []
    for backend, prec, why_not in runnable_combinations(art):
        key = f"{backend}/{prec}"
        if why_not:
            art.gate[key] = Verdict.not_measured(why_not).to_dict()
            log(f"  {art.file} {key}: not measured here ({why_not})")
            continue
        t = time.time()
        try:
            probs = run_backend(pkg, art, backend, prec, data.tensors)
        except Exception as e:
            art.gate[key] = Verdict(False, [f"failed to run: {e}"]).to_dict()
            log(f"  {art.file} {key}: failed to run: {e}")
            continue
        parity = compare(ref_probs, probs, data.labels if (data.labels >= 0).all() else None, pkg.classes, pkg.normal_class)
        parity.seconds = round(time.time() - t, 2)
        gate = judge(parity, prec, pkg.classes, pkg.normal_class)
        art.parity[key], art.gate[key] = parity.to_dict(), gate.to_dict()
        art.parity[key].update(sources_and_near_ties(ref_probs, probs, data.sources, backend, prec))
        rows.append((f"{art.file} {key}", parity, gate))
    return rows


def pick_calibration(items: list, n: int, by_source: bool = False, seed: int = 0) -> list[int]:
    """Indices of min(n, len(items)) calibration items, deterministic for a seed. by_source: an equal
    share per data source (all of a source that has fewer), the rest at random from what is left."""
    rng = np.random.default_rng(seed)
    n = min(int(n), len(items))
    if not by_source:
        return sorted(int(i) for i in rng.choice(len(items), n, replace=False))
    src = np.array([str(getattr(it, "source", "") or "") for it in items])
    kinds = sorted(set(src))
    per = n // max(1, len(kinds))
    pick: list[int] = []
    for u in kinds:
        w = np.flatnonzero(src == u)
        pick += [int(i) for i in rng.choice(w, min(per, len(w)), replace=False)]
    rest = np.setdiff1d(np.arange(len(items)), pick)
    pick += [int(i) for i in rng.choice(rest, n - len(pick), replace=False)]
    return sorted(pick)


def export_checkpoint(checkpoint, out, settings: ExportSettings | None = None, log=print) -> ModelPackage:
    """checkpoint -> gated model package in `out` (an existing folder there is replaced), built as
    `settings` (export.settings.ExportSettings) says; log receives one str per progress line.

    Steps: ONNX fp32 (checked against torch on a probe batch), the parity set and its torch fp32
    reference, INT8 (calibrated, quantized, gated; retried once with the sensitive layers in float),
    the fp32 gate, OpenVINO IR / TensorRT engines, the reference set, provenance, model.json.
    Raises ValueError without a parity set (settings.gate.val) or, for int8, without a calibration
    set; RuntimeError when the ONNX export disagrees with torch; GateFailed (after writing the
    package) when a measured combination fails its gate and settings.gate.keep_failed is False."""
    from cxr_edge.train.checkpoint import load_checkpoint
    s = settings or ExportSettings()
    t0 = time.time()
    net, meta = load_checkpoint(checkpoint)
    pkg = _new_package(checkpoint, out, meta, s)
    fp32 = _export_fp32(net, pkg, s.features, log)
    data = _load_parity_set(pkg, s.gate, log)
    ref = torch_probs(net, data.tensors)
    rows = [_gate_torch_backend(pkg, fp32, ref, data)]
    if "int8" in s.precisions:
        rows += _export_int8(net, pkg, fp32, data, ref, s.int8, log)
    rows += gate_artifact(pkg, fp32, ref, data, log)
    _export_other_formats(pkg, fp32, s, log)
    _add_reference_set(net, pkg, data, _set_name(s.gate.val), s.reference, log)
    _record_provenance(pkg, checkpoint, meta, data, ref, _set_name(s.gate.val), t0)
    return _finish(pkg, rows, s.gate.keep_failed, log)


def _set_name(given) -> str:
    """What model.json calls an image set: a path's last part, a LabelledSet's name, else "given"
    (never a host path)."""
    return Path(given).name if isinstance(given, str) else getattr(given, "name", "given")


def _new_package(checkpoint, out, meta: dict, s: ExportSettings) -> ModelPackage:
    """An empty package in `out` (replacing what is there), described by the checkpoint's meta."""
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cam = {"features_output": "features", "head": meta["architecture"].get("head", "linear")} if s.features else {}
    return ModelPackage(root=out, name=s.name or meta.get("experiment") or Path(checkpoint).stem,
                        classes=meta["classes"], preprocess=spec, normal_class=meta.get("normal_class"),
                        architecture=meta["architecture"], cam=cam, provenance=dict(s.provenance or {}))


def _export_fp32(net, pkg: ModelPackage, features: bool, log) -> Artifact:
    """model.onnx, checked against torch on a random probe batch before anything else uses it."""
    spec = pkg.preprocess
    shape = (spec.channels, spec.size, spec.size)
    onnx_path = export_onnx(net, shape, pkg.root / artifact_format("fp32").suffix, features=features)
    probe = np.random.default_rng(0).standard_normal((2,) + shape).astype(np.float32)
    with torch.inference_mode():
        d = float(np.abs(run_onnx(onnx_path, probe) - net(torch.from_numpy(probe)).numpy()).max())
    if d > 1e-3:
        raise RuntimeError(f"exported ONNX disagrees with torch on a probe batch (max |dlogit| {d:.2e})")
    fp32 = pkg.add_artifact(Artifact(file=onnx_path.name, format="onnx", precision="fp32",
                                     outputs=["logits", "features"] if features else ["logits"]))
    log(f"wrote {onnx_path.name} ({fp32.bytes / 1e6:.1f} MB); probe max |dlogit| vs torch {d:.1e}")
    return fp32


def _load_parity_set(pkg: ModelPackage, gate: GateSettings, log) -> LabelledSet:
    """The labelled parity set, preprocessed with the package's spec (a LabelledSet as given)."""
    val = gate.val
    if val is None:
        raise ValueError("a labelled set (--val) is required: every artifact is gated on real images")
    data = val if isinstance(val, LabelledSet) else \
        load_images(resolve_set(val, "test") if isinstance(val, str) else val, pkg.preprocess, pkg.classes,
                    gate.val_limit)
    log(f"parity set: {len(data.paths)} labelled images"
        + (f" ({len(data.skipped)} unreadable skipped)" if data.skipped else ""))
    return data


def _gate_torch_backend(pkg: ModelPackage, fp32: Artifact, ref: np.ndarray, data: LabelledSet) -> tuple:
    """The torch backend reads its weights from model.onnx: prove it is the checkpoint's network.
    Records the torch/fp32 parity and gate in `fp32`; returns its (row name, ParityStats, Verdict)."""
    tb = run_backend(pkg, fp32, "torch", "fp32", data.tensors)
    tp = compare(ref, tb, data.labels, pkg.classes, pkg.normal_class)
    tg = judge(tp, "fp32", pkg.classes, pkg.normal_class)
    fp32.parity["torch/fp32"], fp32.gate["torch/fp32"] = tp.to_dict(), tg.to_dict()
    return (f"{fp32.file} torch/fp32", tp, tg)


def _export_int8(net, pkg: ModelPackage, fp32: Artifact, data: LabelledSet, ref: np.ndarray,
                 opts: Int8Settings, log) -> list:
    """model.int8.onnx, quantized as opts.quant says and gated; a plain PTQ build that passes no
    gate is quantized once more with the sensitive layers (stem conv, classifier) in float.
    Returns the int8 gate rows."""
    cal = _calibration_set(opts, pkg.preprocess, log)
    onnx_path, int8_path = pkg.root / fp32.file, pkg.root / artifact_format("int8").suffix
    # a copy: the sensitive-layer names and the retry below change it; the caller's stays as given
    settings = QuantSettings(**vars(opts.quant))
    if settings.ignored == ["<sensitive>"]:
        settings.ignored = sensitive_layers(onnx_path)
    ctrl, ctrl_name = _control_set(net, pkg, opts.control, data) if settings.max_drop is not None else (None, None)
    extra = _quantize_int8(onnx_path, int8_path, cal, settings, opts.calib_by_source, ctrl, ctrl_name)
    int8 = pkg.add_artifact(Artifact(file=int8_path.name, format="onnx-qdq", precision="int8",
                                     outputs=fp32.outputs, extra=extra))
    rows = gate_artifact(pkg, int8, ref, data, log)
    if rows and not any(g.passed for _, _, g in rows) and settings.max_drop is None and not settings.ignored:
        settings.ignored = sensitive_layers(onnx_path)
        log(f"int8 failed its gate; retrying with ignored scope {settings.ignored}")
        extra = _quantize_int8(onnx_path, int8_path, cal, settings, opts.calib_by_source)
        int8.parity, int8.gate, int8.extra = {}, {}, extra
        pkg.add_artifact(int8)
        rows = gate_artifact(pkg, int8, ref, data, log)
    return rows


def _calibration_set(opts: Int8Settings, spec: PreprocessSpec, log) -> LabelledSet:
    """opts.calib_size images of opts.calib (at random, or balanced by source), preprocessed."""
    items = resolve_set(opts.calib, "train") if isinstance(opts.calib, str) else (opts.calib or None)
    if items is None:
        raise ValueError("int8 needs a calibration set (--calib DIR or RUN/split.json:train)")
    if isinstance(items, LabelledSet):  # already preprocessed (e.g. cached): pick from its tensors
        pick = pick_calibration([SimpleNamespace(source=s) for s in items.sources], opts.calib_size,
                                opts.calib_by_source)
        cal = LabelledSet(items.tensors[pick], items.labels[pick], [items.paths[i] for i in pick])
    else:
        items = list(items)
        pick = pick_calibration(items, opts.calib_size, opts.calib_by_source)
        cal = load_images([items[i] for i in pick], spec, None)
    log(f"calibration set: {len(cal.paths)} images" + (" (balanced by source)" if opts.calib_by_source else ""))
    return cal


def _control_set(net, pkg: ModelPackage, control, data: LabelledSet) -> tuple[tuple, str]:
    """((control tensors, their torch fp32 probabilities), what model.json calls the set) for
    accuracy-controlled INT8; control None: the parity set."""
    if control is None:
        ctrl_set, name = data, "the parity set (the gate then measures on the images it was tuned on)"
    else:
        ctrl_set = control if isinstance(control, LabelledSet) else \
            load_images(resolve_set(control, "val") if isinstance(control, str) else control, pkg.preprocess,
                        pkg.classes)
        name = _set_name(control)
    return (ctrl_set.tensors, torch_probs(net, ctrl_set.tensors)), name


def _quantize_int8(onnx_path, int8_path, cal: LabelledSet, settings: QuantSettings, by_source: bool,
                   ctrl: tuple | None = None, ctrl_name: str | None = None) -> dict:
    """quantize(), plus what the int8 artifact's `extra` says about its calibration and control sets."""
    extra = quantize(onnx_path, int8_path, cal.tensors, settings, ctrl)
    extra["calibration"] = "balanced by source" if by_source else "random"
    if ctrl is not None:
        extra["control_set"] = ctrl_name
    return extra


def _export_other_formats(pkg: ModelPackage, fp32: Artifact, s: ExportSettings, log) -> None:
    """OpenVINO IR from model.onnx, and TensorRT engines, when s.formats asks for them."""
    if "openvino" in s.formats:
        from .openvino_ir import export_ir
        xml = export_ir(pkg.root / fp32.file, pkg.root)
        # the .bin is read with the .xml: listed as a companion, so it is checksummed too (issue 14)
        pkg.add_artifact(Artifact(file=xml.name, format="openvino-ir", precision="fp32", outputs=fp32.outputs,
                                  companions=[{"file": xml.with_suffix(".bin").name}],
                                  extra={"weights": xml.with_suffix(".bin").name}))
    if "tensorrt" in s.formats:
        from .tensorrt_build import build_engines
        pkg.provenance["tensorrt"] = build_engines(pkg, s.precisions, log)


def _add_reference_set(net, pkg: ModelPackage, data: LabelledSet, parity_name: str, opts: ReferenceSettings,
                       log) -> None:
    """The package's reference set (export/reference_set.py), with the torch fp32 outputs."""
    from .reference_set import (
        VARIANTS,
        from_paths,
        sample_variants,
        write_reference_set,
    )
    paths, k, source = _reference_images(data, parity_name, opts)
    if opts.variants:
        x, _ = sample_variants(paths, pkg.preprocess)
        source += f", each as is and as {len(VARIANTS) - 1} deterministic variants ({', '.join(VARIANTS[1:])})"
    else:
        x = from_paths(paths, pkg.preprocess)
    rs = write_reference_set(pkg, net, x, source, k=k)
    log(f"reference set: {rs['shape'][0]} images ({rs['source']})")


def _reference_images(data: LabelledSet, parity_name: str, opts: ReferenceSettings) -> tuple[list, int | None, str]:
    """(image paths, how many to keep or None for all, description) of the reference set."""
    if opts.images is None:
        # twice K candidates, in a seeded order: near-ties are dropped (reference_set.MIN_MARGIN), then K kept
        idx = np.random.default_rng(0).permutation(len(data.paths))[:min(2 * opts.k, len(data.paths))]
        return ([data.paths[i] for i in idx], opts.k,
                f"images of the parity set ({parity_name}) in a seed-0 random order")
    items = resolve_set(opts.images, "test") if isinstance(opts.images, str) else opts.images
    paths = sorted(str(getattr(it, "path", it)) for it in items)
    where = Path(opts.images).name if isinstance(opts.images, str) else "a given list"
    return paths, None, f"the {len(paths)} images of {where}"


def _record_provenance(pkg: ModelPackage, checkpoint, meta: dict, data: LabelledSet, ref: np.ndarray,
                       parity_name: str, t0: float) -> None:
    """What made the package: checkpoint hash, parity set (no host paths), library versions, host,
    export time since t0, and the checkpoint's training record."""
    import nncf
    import onnx
    import onnxruntime
    import openvino

    import cxr_edge
    from cxr_edge.package import sha256_file
    pkg.provenance.setdefault("export", {}).update({
        "checkpoint_sha256": sha256_file(checkpoint),
        "parity_set": {"images": len(data.paths), "source": parity_name,
                       "reference_accuracy": float((ref.argmax(1) == data.labels).mean()),
                       **({"by_source": {u: data.sources.count(u) for u in sorted(set(data.sources))}}
                          if any(data.sources) else {})},
        "versions": {"cxr_edge": cxr_edge.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__},
        "host": platform.processor() or platform.machine(),
        "seconds": round(time.time() - t0, 1),
    })
    for k in ("val", "experiment", "train_counts", "epoch"):
        if k in meta:
            pkg.provenance.setdefault("training", {})[k] = meta[k]


def _finish(pkg: ModelPackage, rows: list, keep_failed: bool, log) -> ModelPackage:
    """Drop the artifacts that passed no gate (unless keep_failed), write model.json, log the
    table; raise GateFailed when a measured combination failed and keep_failed is False."""
    table = format_table(rows)
    failed = [a for a in pkg.artifacts if a.format != "openvino-ir"
              and not any(g.get("passed") for g in a.gate.values())]
    if failed and not keep_failed:
        for a in failed:
            (pkg.root / a.file).unlink(missing_ok=True)
        pkg.artifacts = [a for a in pkg.artifacts if a not in failed]
    pkg.write()
    log(table)
    if any(not g.passed for _, _, g in rows) and not keep_failed:
        raise GateFailed(table, pkg)
    return pkg
