"""checkpoint -> model package: ONNX fp32, INT8 Q/DQ, optional OpenVINO IR and TensorRT engines,
each gated by its measured parity with the torch fp32 reference on real labelled images."""
from __future__ import annotations

import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cxr_edge.backends import REGISTRY, precision_support
from cxr_edge.postprocess import softmax
from cxr_edge.decode import DecodeError, decode
from cxr_edge.formats import RUN_PRECISIONS, artifact_format
from cxr_edge.package import Artifact, ModelPackage
from cxr_edge.parity import ParityStats, Verdict, compare, format_table, judge
from cxr_edge.preprocess import PreprocessSpec, preprocess

from .onnx_export import export_onnx, run_onnx
from cxr_edge.nearties import sources_and_near_ties

from .quantize import QuantSettings, quantize, sensitive_layers


class GateFailed(Exception):
    def __init__(self, table: str, package: ModelPackage):
        super().__init__("one or more artifacts failed their parity gate:\n" + table)
        self.table, self.package = table, package


@dataclass
class LabelledSet:
    tensors: np.ndarray
    labels: np.ndarray
    paths: list
    skipped: list = field(default_factory=list)
    sources: list = field(default_factory=list)   # data source per image ("" when unknown)
    name: str = "given"                           # what model.json says the set is (no host paths)


def load_images(items, spec: PreprocessSpec, classes: list | None = None, limit: int | None = None) -> LabelledSet:
    """items: Sample-like objects (path, label) or plain paths. Decoded and preprocessed exactly as
    the runtime does. Unreadable files are reported and skipped."""
    tensors, labels, paths, skipped, sources = [], [], [], [], []
    for it in items:
        if limit and len(tensors) >= limit:
            break
        path = getattr(it, "path", it)
        label = getattr(it, "label", None)
        if classes is not None and label is not None and label not in classes:
            continue
        try:
            tensors.append(preprocess(decode(path, min_side=spec.decode_hint()).pixels, spec))
        except DecodeError as e:
            skipped.append(str(e))
            continue
        labels.append(classes.index(label) if classes is not None and label is not None else -1)
        paths.append(str(path))
        sources.append(str(getattr(it, "source", "") or ""))
    if not tensors:
        raise ValueError("no usable images in the given set")
    return LabelledSet(np.stack(tensors), np.array(labels), paths, skipped, sources)


def resolve_set(spec_str: str, part_default: str):
    """DIR (any train/data layout, or a plain folder of images) or RUN/split.json[:part]."""
    from pathlib import Path as P
    path, _, part = spec_str.partition(":") if spec_str.count(":") == 1 and not P(spec_str).exists() else (spec_str, "", "")
    p = P(path)
    if p.suffix == ".json":
        from cxr_edge.train.experiment import read_split
        # "val+test": several parts of one split, in that order (a bigger parity set)
        return [s for pt in (part or part_default).split("+") for s in read_split(p, pt)]
    if p.is_dir():
        from cxr_edge.train.data import load_dataset
        try:
            return load_dataset(p)
        except Exception:
            from cxr_edge.inputs import expand_inputs
            return expand_inputs([str(p)], recursive=True)
    raise FileNotFoundError(f"{spec_str}: not a directory or split.json")


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


def export_checkpoint(checkpoint, out, precisions=("fp32", "int8"), calib=None, calib_size: int = 300,
                      val=None, val_limit: int | None = None, max_drop: float | None = None,
                      formats=("onnx",), keep_failed: bool = False, features: bool = True,
                      name: str | None = None, provenance: dict | None = None, log=print,
                      quant: QuantSettings | None = None, calib_by_source: bool = False, control=None,
                      reference=None, reference_k: int = 256, reference_variants: bool = False) -> ModelPackage:
    """checkpoint -> gated model package in `out` (replaced).

    val: the labelled parity set (DIR, RUN/split.json[:part[+part]], or Sample-like items); every
    artifact is measured against the torch fp32 reference on it and gated (formats.TOLERANCES).
    int8: calibrated on `calib_size` images of `calib` (random, or balanced by source), quantized as
    `quant` says (export.quantize.QuantSettings; `max_drop` is a shortcut for accuracy control, whose
    control images are `control`, default the parity set).
    reference: images for the package's reference set (see export/reference_set.py): None = K
    (`reference_k`) images of the parity set; a DIR / split spec / list of paths otherwise; with
    `reference_variants` each image also gives 8 deterministic variants.
    Raises GateFailed (after writing the package) when a measured combination fails its gate and
    keep_failed is False."""
    from cxr_edge.train.checkpoint import load_checkpoint
    t0 = time.time()
    net, meta = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    classes = meta["classes"]
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pkg = ModelPackage(root=out, name=name or meta.get("experiment") or Path(checkpoint).stem, classes=classes,
                       preprocess=spec, normal_class=meta.get("normal_class"), architecture=meta["architecture"],
                       cam={"features_output": "features", "head": meta["architecture"].get("head", "linear")} if features else {},
                       provenance=dict(provenance or {}))
    shape = (spec.channels, spec.size, spec.size)

    # -- ONNX fp32 -----------------------------------------------------------------------------
    onnx_path = export_onnx(net, shape, out / artifact_format("fp32").suffix, features=features)
    probe = np.random.default_rng(0).standard_normal((2,) + shape).astype(np.float32)
    with torch.inference_mode():
        d = float(np.abs(run_onnx(onnx_path, probe) - net(torch.from_numpy(probe)).numpy()).max())
    if d > 1e-3:
        raise RuntimeError(f"exported ONNX disagrees with torch on a probe batch (max |dlogit| {d:.2e})")
    fp32 = pkg.add_artifact(Artifact(file=onnx_path.name, format="onnx", precision="fp32",
                                     outputs=["logits", "features"] if features else ["logits"]))
    log(f"wrote {onnx_path.name} ({fp32.bytes / 1e6:.1f} MB); probe max |dlogit| vs torch {d:.1e}")

    # -- labelled parity set (and calibration set) -----------------------------------------------
    if val is None:
        raise ValueError("a labelled set (--val) is required: every artifact is gated on real images")
    data = val if isinstance(val, LabelledSet) else \
        load_images(resolve_set(val, "test") if isinstance(val, str) else val, spec, classes, val_limit)
    log(f"parity set: {len(data.paths)} labelled images" + (f" ({len(data.skipped)} unreadable skipped)" if data.skipped else ""))
    ref = torch_probs(net, data.tensors)
    ref_acc = float((ref.argmax(1) == data.labels).mean())
    rows = []
    # The torch backend reads its weights from model.onnx: prove it is the checkpoint's network.
    tb = run_backend(pkg, fp32, "torch", "fp32", data.tensors)
    tp = compare(ref, tb, data.labels, classes, pkg.normal_class)
    tg = judge(tp, "fp32", classes, pkg.normal_class)
    fp32.parity["torch/fp32"], fp32.gate["torch/fp32"] = tp.to_dict(), tg.to_dict()
    rows.append((f"{fp32.file} torch/fp32", tp, tg))

    if "int8" in precisions:
        calib_items = resolve_set(calib, "train") if isinstance(calib, str) else (calib or None)
        if calib_items is None:
            raise ValueError("int8 needs a calibration set (--calib DIR or RUN/split.json:train)")
        if isinstance(calib_items, LabelledSet):  # already preprocessed (e.g. cached): pick from its tensors
            pick = pick_calibration([SimpleNamespace(source=s) for s in calib_items.sources], calib_size, calib_by_source)
            cal = LabelledSet(calib_items.tensors[pick], calib_items.labels[pick], [calib_items.paths[i] for i in pick])
        else:
            calib_items = list(calib_items)
            pick = pick_calibration(calib_items, calib_size, calib_by_source)
            cal = load_images([calib_items[i] for i in pick], spec, None)
        log(f"calibration set: {len(cal.paths)} images" + (" (balanced by source)" if calib_by_source else ""))
        int8_path = out / artifact_format("int8").suffix
        settings = quant or QuantSettings()
        if settings.ignored == ["<sensitive>"]:
            settings.ignored = sensitive_layers(onnx_path)
        if max_drop is not None:
            settings.max_drop = max_drop
        ctrl = None
        if settings.max_drop is not None:
            if control is None:
                ctrl_set, ctrl_name = data, "the parity set (the gate then measures on the images it was tuned on)"
            else:
                ctrl_set = control if isinstance(control, LabelledSet) else \
                    load_images(resolve_set(control, "val") if isinstance(control, str) else control, spec, classes)
                ctrl_name = Path(control).name if isinstance(control, str) else getattr(control, "name", "given")
            ctrl = (ctrl_set.tensors, torch_probs(net, ctrl_set.tensors))
        extra = quantize(onnx_path, int8_path, cal.tensors, settings, ctrl)
        extra["calibration"] = "balanced by source" if calib_by_source else "random"
        if ctrl is not None:
            extra["control_set"] = ctrl_name
        int8 = pkg.add_artifact(Artifact(file=int8_path.name, format="onnx-qdq", precision="int8",
                                         outputs=fp32.outputs, extra=extra))
        int8_rows = gate_artifact(pkg, int8, ref, data, log)
        if int8_rows and not any(g.passed for _, _, g in int8_rows) and settings.max_drop is None \
                and not settings.ignored:
            # Keep the most sensitive layers (stem conv, classifier) in float and try once more.
            settings.ignored = sensitive_layers(onnx_path)
            log(f"int8 failed its gate; retrying with ignored scope {settings.ignored}")
            extra = quantize(onnx_path, int8_path, cal.tensors, settings)
            extra["calibration"] = "balanced by source" if calib_by_source else "random"
            int8.parity, int8.gate, int8.extra = {}, {}, extra
            pkg.add_artifact(int8)
            int8_rows = gate_artifact(pkg, int8, ref, data, log)
        rows += int8_rows
    rows += gate_artifact(pkg, fp32, ref, data, log)

    if "openvino" in formats:
        from .openvino_ir import export_ir
        xml = export_ir(onnx_path, out)
        # the .bin is read with the .xml: listed as a companion, so it is checksummed too (issue 14)
        pkg.add_artifact(Artifact(file=xml.name, format="openvino-ir", precision="fp32", outputs=fp32.outputs,
                                  companions=[{"file": xml.with_suffix(".bin").name}],
                                  extra={"weights": xml.with_suffix(".bin").name}))
    if "tensorrt" in formats:
        from .tensorrt_build import build_engines
        pkg.provenance["tensorrt"] = build_engines(pkg, precisions, log)

    # -- reference set (export/reference_set.py) ----------------------------------------------------
    from .reference_set import VARIANTS, from_paths, sample_variants, write_reference_set
    parity_name = Path(val).name if isinstance(val, str) else getattr(val, "name", "given")
    ref_k = None
    if reference is None:
        # twice K candidates, in a seeded order: near-ties are dropped (reference_set.MIN_MARGIN), then K kept
        idx = np.random.default_rng(0).permutation(len(data.paths))[:min(2 * reference_k, len(data.paths))]
        ref_paths, ref_k = [data.paths[i] for i in idx], reference_k
        ref_source = f"images of the parity set ({parity_name}) in a seed-0 random order"
    else:
        items = resolve_set(reference, "test") if isinstance(reference, str) else reference
        ref_paths = sorted(str(getattr(it, "path", it)) for it in items)
        ref_source = f"the {len(ref_paths)} images of {Path(reference).name if isinstance(reference, str) else 'a given list'}"
    if reference_variants:
        ref_x, _ = sample_variants(ref_paths, spec)
        ref_source += f", each as is and as {len(VARIANTS) - 1} deterministic variants ({', '.join(VARIANTS[1:])})"
    else:
        ref_x = from_paths(ref_paths, spec)
    rs = write_reference_set(pkg, net, ref_x, ref_source, k=ref_k)
    log(f"reference set: {rs['shape'][0]} images ({rs['source']})")

    # -- record, decide ---------------------------------------------------------------------------
    import cxr_edge, onnx, onnxruntime, openvino, nncf
    pkg.provenance.setdefault("export", {}).update({
        "checkpoint_sha256": __import__("cxr_edge.package", fromlist=["sha256_file"]).sha256_file(checkpoint),
        "parity_set": {"images": len(data.paths), "source": Path(val).name if isinstance(val, str) else getattr(val, "name", "given"),  # no host paths in model.json
                       "reference_accuracy": ref_acc,
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
    table = format_table(rows)
    failed = [a for a in pkg.artifacts if a.format != "openvino-ir"
              and not any(g.get("passed") for g in a.gate.values())]
    if failed and not keep_failed:
        for a in failed:
            (out / a.file).unlink(missing_ok=True)
        pkg.artifacts = [a for a in pkg.artifacts if a not in failed]
    pkg.write()
    log(table)
    if any(not g.passed for _, _, g in rows) and not keep_failed:
        raise GateFailed(table, pkg)
    return pkg
