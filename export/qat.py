"""Quantization-aware fine-tuning for fidelity: an INT8 model trained to agree with its own fp32 reference.

Post-training recipes (export/int8_study.py) leave the default DenseNet121 at ~99.3 % top-1
agreement with torch fp32 and a max |Δp| of ~0.2 on unseen images. Here the fp32 network is
quantized with NNCF for torch (fake-quantize modules, the same preset and ignored scope as the
shipped PTQ recipe: stem convolution and classifier head in float), then fine-tuned by knowledge
distillation from the frozen fp32 reference itself (Hinton et al., 2015): the loss is the KL
divergence of the student's class probabilities from the reference's plus the mean squared error
of the pooled feature vectors (scaled by their variance), so the int8 model keeps the reference's
probabilities and the features the input guard and CAM read. Only train-split images are used;
the head stays frozen (CAM reads its fp32 weights from model.onnx) and BatchNorm statistics stay
frozen (eval mode). The result is exported as a Q/DQ ONNX (inputs/outputs as model.onnx) and
scored by int8_study's statistics on the split's val+test images, next to the shipped file.

    python -m cxr_edge.export.qat PACKAGE --split RUN/split.json --out DIR [--epochs 2] [--lr 1e-5]
        [--tensors CACHE.npz] [--limit N]

Writes DIR/qat.int8.onnx, DIR/qat.json (scores, settings, per-epoch loss) and DIR/qat.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from cxr_edge.package import ModelPackage

from . import int8_study

# NNCF for torch compiles a C++ extension on first use and gives up after 60 s by default: on a
# 2-core machine the build takes minutes. A user's own setting wins.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")


def _batches(n: int, batch: int, rng: np.random.Generator):
    if n < batch:
        raise ValueError(f"{n} training images are fewer than one batch of {batch}")
    order = rng.permutation(n)
    for i in range(0, n - batch + 1, batch):
        yield order[i:i + batch]


def teacher_outputs(net, x: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), pooled features (N, C)) of the fp32 reference, float32."""
    import torch
    logits, feats = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            lg, f = net.forward_with_features(torch.from_numpy(x[i:i + batch]))
            logits.append(lg.float().numpy())
            feats.append(f.float().mean((2, 3)).numpy())
    return np.concatenate(logits), np.concatenate(feats)


def quantize_for_training(net, calib: np.ndarray):
    """NNCF fake-quantized copy of `net` (preset mixed; stem convolution and head in float)."""
    import nncf
    import torch

    from cxr_edge.architectures import WithFeatures
    wrapper = WithFeatures(copy.deepcopy(net)).eval()
    ds = nncf.Dataset([torch.from_numpy(calib[i:i + 1]) for i in range(len(calib))])
    ignored = nncf.IgnoredScope(names=float_nodes(wrapper, torch.from_numpy(calib[:1])))
    return nncf.quantize(wrapper, ds, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calib),
                         fast_bias_correction=True, ignored_scope=ignored)


def float_nodes(wrapper, example) -> list[str]:
    """NNCF node names of the stem convolution (the first conv2d) and every linear layer: the
    torch counterpart of quantize.sensitive_layers (the shipped recipe's ignored scope)."""
    from nncf.torch.function_hook import wrap_model
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    graph = build_nncf_graph(wrap_model(copy.deepcopy(wrapper)), example)
    ops = [n for n in graph.topological_sort() if n.node_type in ("conv2d", "linear")]
    convs = [n.node_name for n in ops if n.node_type == "conv2d"]
    return convs[:1] + [n.node_name for n in ops if n.node_type == "linear"]


def fine_tune(qnet, x: np.ndarray, t_logits: np.ndarray, t_feats: np.ndarray, epochs: int, lr: float,
              batch: int = 16, feature_weight: float = 1.0, seed: int = 0, guard=None, log=print) -> list[dict]:
    """Distil the reference into the fake-quantized network in place; returns per-epoch mean losses.

    The feature term is the squared error of the pooled features in the input guard's own metric
    when `guard` (a cxr_edge.guard.GapMahalanobis) is given — (d^T P d) / C with P = a I - U U^T, so
    the guard scores int8 features as it scores fp32 ones — else scaled by each channel's variance."""
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    for n, p in qnet.named_parameters():
        if p.is_floating_point():   # NNCF also registers integer parameters (quantizer state)
            p.requires_grad_(".head." not in f".{n}")     # CAM reads the fp32 head: keep it identical
    params = [p for p in qnet.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    fvar = torch.from_numpy(t_feats.var(0) + 1e-6)
    if guard is not None:
        a = float(guard.isotropic_precision)
        u = torch.from_numpy(np.asarray(guard.correction, np.float32))

        def feature_loss(d):
            return ((a * (d ** 2).sum(1) - ((d @ u) ** 2).sum(1)) / d.shape[1]).mean()
    else:
        def feature_loss(d):
            return ((d ** 2) / fvar).mean()
    qnet.eval()   # BatchNorm statistics frozen; fake quantizers still pass gradients
    history = []
    for ep in range(epochs):
        t0, tot_kl, tot_f, n = time.time(), 0.0, 0.0, 0
        for idx in _batches(len(x), batch, rng):
            xb = torch.from_numpy(x[idx])
            logits, fmap = qnet(xb)
            kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(torch.from_numpy(t_logits[idx]), 1),
                          reduction="batchmean", log_target=True)
            fl = feature_loss(fmap.mean((2, 3)) - torch.from_numpy(t_feats[idx]))
            loss = kl + feature_weight * fl
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot_kl += float(kl.detach()) * len(idx)
            tot_f += float(fl.detach()) * len(idx)
            n += len(idx)
        history.append({"epoch": ep + 1, "kl": tot_kl / n, "feature_mse": tot_f / n, "seconds": round(time.time() - t0, 1)})
        log(f"epoch {ep + 1}: KL {tot_kl / n:.5f}, feature MSE {tot_f / n:.4f}, {time.time() - t0:.0f} s")
    return history


def export_qdq(qnet, input_shape: tuple, path: Path) -> Path:
    """The fine-tuned fake-quantized network as a Q/DQ ONNX with model.onnx's input/outputs."""
    import onnx
    import torch

    from .onnx_export import OPSET
    # NNCF's quantizer modules trace as QuantizeLinear/DequantizeLinear pairs in this export mode
    # (nncf.strip is not needed, and its torch path imports torchao)
    _set_qdq_export(qnet)
    x = torch.zeros((1,) + tuple(input_shape), dtype=torch.float32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(qnet.eval(), (x,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits", "features"],
                          dynamic_axes={n: {0: "batch"} for n in ("input", "logits", "features")})
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    m.producer_version = ""
    onnx.save(m, str(path))
    return path


def _set_qdq_export(model) -> None:
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode
    for mod in model.modules():
        if isinstance(mod, BaseQuantizer):
            mod.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)


def compact_weights(path: Path) -> Path:
    """Fold every weight QuantizeLinear (float initializer -> Q -> DQ) into an integer initializer
    feeding its DQ: the same values (ONNX QuantizeLinear: saturate(round half to even(w / scale) +
    zero_point), per axis), a quarter of the bytes. The torch exporter writes the weights in float."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    drop, uses = set(), {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for n in list(g.node):
        if (n.op_type != "QuantizeLinear" or n.input[0] not in inits or len(n.input) < 3
                or n.input[1] not in consts or n.input[2] not in consts):
            continue
        w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
        scale, zp = consts[n.input[1]].astype(np.float32), consts[n.input[2]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.float32), info.min, info.max).astype(zp.dtype)
        qname = n.input[0] + "_quantized"
        g.initializer.append(numpy_helper.from_array(q, qname))
        for d in g.node:
            d.input[:] = [qname if i == n.output[0] else i for i in d.input]
        g.node.remove(n)
        if uses.get(n.input[0], 0) == 1:
            drop.add(n.input[0])
    keep = [t for t in g.initializer if t.name not in drop]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def install(package, int8_file: Path, split: str, extra: dict, log=print) -> list:
    """Replace `package`'s INT8 artifact with `int8_file`: gated on the split's val+test images
    against the torch fp32 reference on every backend runnable here (export.pipeline.gate_artifact),
    `extra` recorded, model.json and the model card rewritten. The candidate is gated under a
    temporary name and moved over the old file only after a pass. Returns the gate rows; raises
    RuntimeError, with the package unchanged, when no measured combination passes."""
    import shutil

    from cxr_edge.backends.torch_backend import reference_network
    from cxr_edge.labelled import load_images, resolve_set
    from cxr_edge.package import Artifact

    from .model_card import render
    from .pipeline import gate_artifact, torch_probs
    pkg = ModelPackage.read(package)
    fp32, old = pkg.artifact("fp32"), pkg.artifact("int8")
    data = load_images(resolve_set(f"{split}:val+test", "test"), pkg.preprocess, pkg.classes)
    ref = torch_probs(reference_network(pkg).eval(), data.tensors)
    name = old.file if old else "model.int8.onnx"
    candidate = pkg.root / ("candidate." + name)
    shutil.copyfile(int8_file, candidate)
    try:
        art = Artifact(file=candidate.name, format="onnx-qdq", precision="int8", outputs=fp32.outputs, extra=extra)
        pkg.add_artifact(art)
        rows = gate_artifact(pkg, art, ref, data, log)
        if not any(g.passed for _, _, g in rows):
            raise RuntimeError(f"{int8_file}: no backend passed the int8 gate; {package} is unchanged")
        os.replace(candidate, pkg.root / name)   # a new inode: never writes through a hard link into a copy
    finally:
        candidate.unlink(missing_ok=True)
    pkg.artifacts = [a for a in pkg.artifacts if a.file not in (name, candidate.name)]
    art.file = name
    pkg.add_artifact(art)                         # re-stamps size and sha256 under the real name
    pkg.write()
    card = pkg.provenance.get("model_card")
    if card:
        (pkg.root / "MODEL_CARD.md").write_text(render(pkg, card))
    return rows


def main(argv=None) -> int:
    """CLI entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.export.qat", description=__doc__.split("\n\n")[0])
    ap.add_argument("package")
    ap.add_argument("--split", required=True, help="RUN/split.json of the package's training run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tensors", help="cached tensors from int8_study (default OUT/tensors.npz)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib", type=int, default=300, help="calibration images for the initial ranges")
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--guard-metric", action="store_true",
                    help="measure the feature error in the package's input-guard (Mahalanobis) metric")
    ap.add_argument("--install", metavar="SCORED_DIR",
                    help="do not train: put SCORED_DIR/qat.int8.onnx (weights folded to int8) into PACKAGE as its "
                    "INT8 artifact, gated on the split's val+test images, and rewrite the model card")
    ap.add_argument("--limit", type=int, help="fine-tune on N train images, picked balanced by source (default: all)")
    a = ap.parse_args(argv)
    from cxr_edge.backends.torch_backend import reference_network
    if a.install:
        return _install_scored(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pkg = ModelPackage.read(a.package)
    data = int8_study.load_tensors(pkg, a.split, Path(a.tensors) if a.tensors else out / "tensors.npz")
    keep = (int8_study.pick_images(data["train_src"], a.limit, by_source=True) if a.limit
            else np.arange(len(data["train_x"])))
    x, src = data["train_x"][keep], data["train_src"][keep]
    net = reference_network(pkg).eval()
    t0 = time.time()
    t_logits, t_feats = teacher_outputs(net, x)
    cal = int8_study.pick_images(src, min(a.calib, len(x)), by_source=True)
    qnet = quantize_for_training(net, x[cal])
    print(f"reference outputs and NNCF ranges: {time.time() - t0:.0f} s")
    from cxr_edge.guard import read_guard_parameters
    guard = read_guard_parameters(pkg) if a.guard_metric else None
    history = fine_tune(qnet, x, t_logits, t_feats, a.epochs, a.lr, a.batch, a.feature_weight, guard=guard)
    path = compact_weights(export_qdq(qnet, tuple(x.shape[1:]), out / "qat.int8.onnx"))
    ref = int8_study.reference_probs(pkg, data["eval_x"])
    results = {}
    shipped_art = pkg.artifact("int8")
    shipped = Path(a.package) / shipped_art.file if shipped_art else None
    shipped_calib = (getattr(pkg.artifact("int8"), "extra", None) or {}).get("calibration_images", "?")
    for name, p, calib in (("shipped", shipped, shipped_calib), ("qat", path, a.calib)):
        if p is None:
            continue
        results[name] = int8_study.score(ref, int8_study.openvino_probs(int8_study.compile_openvino(p), data["eval_x"]), data["eval_src"])
        results[name].update(quantize_seconds=None, variant={"calib_size": calib, "by_source": name == "qat"})
    settings = {"method": "nncf.quantize (torch) + distillation fine-tuning (KL to torch fp32 + pooled-feature MSE)",
                "preset": "mixed", "ignored": "stem convolution, head", "epochs": a.epochs, "lr": a.lr,
                "batch": a.batch, "train_images": len(x), "calibration_images": len(cal), "picked": "by source",
                "feature_weight": a.feature_weight, "frozen": "head, BatchNorm statistics",
                "feature_metric": "input guard's Mahalanobis metric" if guard is not None else "per-channel variance"}
    results["qat"]["extra"] = settings
    latency = int8_study.interleaved_latency({k: p for k, p in (("shipped", shipped), ("qat", path)) if p},
                                             data["eval_x"][:1])
    for k in results:
        results[k]["latency_b1_ms"] = latency[k]
    (out / "qat.json").write_text(json.dumps({"settings": settings, "history": history, "results": results}, indent=1))
    md = int8_study.markdown(results, latency)
    (out / "qat.md").write_text(md)
    print(md)
    return 0


def _install_scored(a) -> int:
    src = Path(a.install)
    study = json.loads((src / "qat.json").read_text())
    path = compact_weights(src / "qat.int8.onnx")    # a no-op on a file already compacted
    pkg = ModelPackage.read(a.package)
    old = pkg.artifact("int8")
    tried = [{**v, "variant": v["variant"].replace("(shipped)", "(shipped before QAT)")}
             for v in ((old.extra or {}).get("variants_tried", []) if old else [])]
    for k, r in study["results"].items():
        if k == "qat":
            tried.append({"variant": f"QAT by distillation ({study['settings']['train_images']} train images, "
                                     f"{study['settings']['epochs']} epochs, lr {study['settings']['lr']}) (shipped)",
                          **{f: r[f] for f in ("n", "agreement", "lower_bound", "max_abs_dp", "p99_abs_dp",
                                               "uncertain", "flips_not_uncertain")}})
    extra = {**study["settings"], "variants_tried": tried}
    for row in install(a.package, path, a.split, extra):
        print(row[0], "pass" if row[2].passed else "FAIL")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
