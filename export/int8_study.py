"""Which INT8 recipe keeps its promise: quantize one package's fp32 ONNX several ways and measure each
against the torch fp32 reference on the same unseen images, in one run.

    python -m cxr_edge.export.int8_study PACKAGE --split RUN/split.json --out DIR [--variants a,b]

PACKAGE's model.onnx is quantized per variant (calibration on the split's train part, picked at
random or balanced by data source; NNCF fast or full bias correction; an ignored scope; accuracy
control driven by the gate's own metric on train images the calibration did not use) and each
result runs on OpenVINO (CPU, f32 for the layers left in float, as the runtime runs int8) over the
split's val+test part. Reported per variant: n, top-1 agreement with torch fp32 and its Wilson 95 %
lower bound (the gate's statistic, cxr_edge.formats), label flips, max and p99 of the per-image
max |Δp|, how many images the near-tie rule (cxr_edge.nearties) flags and how many flips it misses,
per-source agreement, the quantization time, and batch-1 latency measured interleaved with every
other variant (median of 3 rounds; these machines are noisy, so compare ratios, not absolutes).
Writes DIR/int8_study.json and DIR/int8_study.md; DIR/<variant>.int8.onnx keeps each model.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr_edge.formats import wilson_lower_bound
from cxr_edge.nearties import FACTOR, margins
from cxr_edge.package import ModelPackage
from cxr_edge.postprocess import softmax

from .quantize import QuantSettings, quantize, sensitive_layers


@dataclass
class Variant:
    """One INT8 recipe: quantization settings and how its calibration images are picked."""
    name: str
    calib_size: int = 300
    by_source: bool = False
    fast_bias_correction: bool = True
    ignore_sensitive: bool = True          # stem convolution and classifier stay in float
    max_drop: float | None = None          # set: NNCF accuracy control on `control_size` train images
    control_size: int = 400
    extra_ignored: list = field(default_factory=list)

    def settings(self, fp32_path) -> QuantSettings:
        ignored = (sensitive_layers(fp32_path) if self.ignore_sensitive else []) + list(self.extra_ignored)
        return QuantSettings(fast_bias_correction=self.fast_bias_correction, ignored=ignored,
                             max_drop=self.max_drop)


VARIANTS = {v.name: v for v in (
    Variant("plain-random300", ignore_sensitive=False),
    Variant("ignored-random300"),                                   # the recipe shipped with v1
    Variant("ignored-source300", by_source=True),
    Variant("ignored-source1000", calib_size=1000, by_source=True),
    Variant("ignored-source1000-fullbc", calib_size=1000, by_source=True, fast_bias_correction=False),
    Variant("ignored-source1000-ac", calib_size=1000, by_source=True, max_drop=0.005),
    Variant("ignored-random300-ac", max_drop=0.01),
)}


def load_tensors(package: ModelPackage, split: str, cache: Path):
    """Preprocessed train and val+test tensors of a split (cached as float16-exact float32 .npz)."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return {k: z[k] for k in z.files}
    from cxr_edge.labelled import load_images, resolve_set
    out = {}
    for part, items in (("train", resolve_set(f"{split}:train", "train")),
                        ("eval", resolve_set(f"{split}:val+test", "val+test"))):
        s = load_images(items, package.preprocess, package.classes)
        out[f"{part}_x"], out[f"{part}_src"] = s.tensors, np.array(s.sources)
    np.savez(cache, **out)
    return out


def reference_probs(package: ModelPackage, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch
    from cxr_edge.backends.torch_backend import reference_network
    net = reference_network(package).eval()
    with torch.inference_mode():
        return softmax(np.concatenate([net(torch.from_numpy(x[i:i + batch])).float().numpy()
                                       for i in range(0, len(x), batch)]))


def compile_openvino(path: Path):
    import openvino as ov
    return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def openvino_probs(compiled, x: np.ndarray, batch: int = 16) -> np.ndarray:
    return softmax(np.concatenate([compiled(x[i:i + batch])[compiled.output(0)] for i in range(0, len(x), batch)]))


def score(ref: np.ndarray, probs: np.ndarray, sources: np.ndarray) -> dict:
    """Agreement statistics of (N, K) probabilities against the (N, K) reference."""
    agree = ref.argmax(1) == probs.argmax(1)
    dp = np.abs(ref - probs).max(1)
    p99 = float(np.quantile(dp, 0.99))
    uncertain = margins(probs) < FACTOR * p99
    per_source = {}
    for s in sorted(set(sources.tolist())):
        m = sources == s
        per_source[s or "?"] = [int(agree[m].sum()), int(m.sum())]
    return {"n": int(len(agree)), "agree": int(agree.sum()), "agreement": float(agree.mean()),
            "lower_bound": wilson_lower_bound(int(agree.sum()), len(agree)), "flips": int((~agree).sum()),
            "max_abs_dp": float(dp.max()), "p99_abs_dp": p99, "uncertain": int(uncertain.sum()),
            "flips_not_uncertain": int((~agree & ~uncertain).sum()), "per_source": per_source}


def pick_images(sources: np.ndarray, n: int, by_source: bool, exclude=()) -> np.ndarray:
    from types import SimpleNamespace
    from .pipeline import pick_calibration
    pool = np.setdiff1d(np.arange(len(sources)), np.asarray(exclude, int))
    idx = pick_calibration([SimpleNamespace(source=s) for s in sources[pool]], n, by_source)
    return pool[idx]


def run_variant(v: Variant, pkg: ModelPackage, data: dict, ref_eval: np.ndarray, out: Path, log=print) -> dict:
    """Quantize one variant of pkg's model.onnx to out/<name>.int8.onnx and score it on the eval tensors."""
    fp32 = Path(pkg.root) / "model.onnx"
    cal = pick_images(data["train_src"], v.calib_size, v.by_source)
    control = None
    if v.max_drop is not None:
        ctl = pick_images(data["train_src"], v.control_size, True, exclude=cal)
        control = (data["train_x"][ctl], reference_probs(pkg, data["train_x"][ctl]))
    path = out / f"{v.name}.int8.onnx"
    t0 = time.perf_counter()
    extra = quantize(fp32, path, data["train_x"][cal], v.settings(fp32), control)
    seconds = time.perf_counter() - t0
    res = score(ref_eval, openvino_probs(compile_openvino(path), data["eval_x"]), data["eval_src"])
    res.update(quantize_seconds=round(seconds, 1), extra=extra, variant=v.__dict__)
    log(f"{v.name}: {res['agree']}/{res['n']} agree (LB {res['lower_bound']:.4f}), max|dp| {res['max_abs_dp']:.3f}, "
        f"p99 {res['p99_abs_dp']:.3f}, uncertain {res['uncertain']}, {seconds:.0f} s")
    return res


def interleaved_latency(paths: dict, x1: np.ndarray, iters: int = 100, rounds: int = 3) -> dict:
    """Batch-1 OpenVINO latency (ms, median over rounds of each round's median), variants interleaved."""
    compiled = {k: compile_openvino(p) for k, p in paths.items()}
    per = {k: [] for k in compiled}
    for _ in range(rounds):
        for k, c in compiled.items():
            for _ in range(10):
                c(x1)
            t = []
            for _ in range(iters):
                t0 = time.perf_counter()
                c(x1)
                t.append(time.perf_counter() - t0)
            per[k].append(float(np.median(t)) * 1e3)
    return {k: {"median_ms": float(np.median(v)), "min_ms": min(v), "max_ms": max(v)} for k, v in per.items()}


def markdown(results: dict, latency: dict) -> str:
    """The study as a markdown table, one row per variant."""
    lines = ["| variant | calib | n | agree % | 95 % LB % | flips | max abs dp | p99 abs dp | uncertain | "
             "flips not flagged | b1 latency ms (min-max) | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        v, lat = r["variant"], latency.get(k, {})
        lines.append(f"| {k} | {v['calib_size']}{' by source' if v['by_source'] else ''} | {r['n']} | "
                     f"{100 * r['agreement']:.2f} | {100 * r['lower_bound']:.2f} | {r['flips']} | "
                     f"{r['max_abs_dp']:.3f} | {r['p99_abs_dp']:.3f} | {r['uncertain']} | {r['flips_not_uncertain']} | "
                     f"{lat.get('median_ms', float('nan')):.2f} ({lat.get('min_ms', float('nan')):.2f}-"
                     f"{lat.get('max_ms', float('nan')):.2f}) | {r['quantize_seconds']} |")
    srcs = sorted({s for r in results.values() for s in r["per_source"]})
    lines += ["", "Per-source agreement (agree/n):", "", "| variant | " + " | ".join(srcs) + " |",
              "|---|" + "---|" * len(srcs)]
    for k, r in results.items():
        lines.append(f"| {k} | " + " | ".join("{}/{}".format(*r["per_source"].get(s, (0, 0))) for s in srcs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """CLI entry point; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.export.int8_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("package", help="model package directory (its model.onnx is quantized)")
    ap.add_argument("--split", required=True, help="RUN/split.json of the package's training run")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names: " + ", ".join(VARIANTS))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pkg = ModelPackage.read(a.package)
    data = load_tensors(pkg, a.split, out / "tensors.npz")
    print(f"train {len(data['train_x'])}, eval {len(data['eval_x'])} images")
    ref = reference_probs(pkg, data["eval_x"])
    results = {}
    shipped = Path(a.package) / "model.int8.onnx"
    if shipped.is_file():   # the package's own INT8, as shipped, scored on the same images
        results["shipped"] = score(ref, openvino_probs(compile_openvino(shipped), data["eval_x"]), data["eval_src"])
        results["shipped"].update(quantize_seconds=None, variant={"calib_size": "?", "by_source": False},
                                  extra=getattr(pkg.artifact("int8"), "extra", {}))
        (out / "shipped.int8.onnx").write_bytes(shipped.read_bytes())
    for name in a.variants.split(","):
        results[name] = run_variant(VARIANTS[name], pkg, data, ref, out)
        (out / "int8_study.json").write_text(json.dumps(results, indent=1))
    latency = interleaved_latency({k: out / f"{k}.int8.onnx" for k in results}, data["eval_x"][:1])
    for k in results:
        results[k]["latency_b1_ms"] = latency[k]
    (out / "int8_study.json").write_text(json.dumps(results, indent=1))
    md = markdown(results, latency)
    (out / "int8_study.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
