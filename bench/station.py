"""`cxr-edge bench --workload full-size`: the X-ray station's path, next to the naive pipeline.

Inputs are built by `fullsize.build` from any radiographs (default: the repository's samples/):
12-bit MONOCHROME1 DICOM with rescale and window, 16-bit PNG, 2 MP JPEG, all 2048 x 2500.

Two jobs, each in its own process (OpenVINO's worker threads and torch's would otherwise compete):

- ``ours``: `cxr_edge.load` (auto backend) — inference-only batch-1 latency, and per input kind:
  decode and preprocess p50 (ms), warm `predict_one` p50 (ms), `Classifier.stream` img/s
  (batch 8), labels/probabilities of each file;
- ``naive``: what a user writes without us — pydicom `apply_modality_lut` + `apply_voi_lut` (or
  PIL open for PNG/JPEG) -> 8-bit PIL -> torchvision Grayscale/Resize/ToTensor/Normalize ->
  torch eager fp32, batch 8, one loop.

The pair is repeated R >= 3 times, alternating which runs first; the headline is the median over
repetitions of each ratio, with its min-max, so a single noisy run cannot make the headline.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import fullsize

REPORT_KIND = "full-size"


def _p50_ms(ts) -> float:
    return float(np.median(np.asarray(ts, np.float64)) * 1e3)


def _cycle(files, n):
    return [files[i % len(files)] for i in range(n)]


# -- the jobs (run in a subprocess) ---------------------------------------------------------------
def measure_ours(job: dict) -> dict:
    import cxr_edge
    from cxr_edge.decode import decode
    from cxr_edge.preprocess import preprocess
    clf = cxr_edge.load(job.get("model"), batch_size=int(job["batch_size"]), threads=job.get("threads"))
    spec = clf.spec
    res = {"backend": clf.backend.describe(), "backend_name": clf.backend_name, "precision": clf.precision,
           "decode_workers": clf.decode_workers, "kinds": {}}
    x = np.zeros((1, spec.channels, spec.size, spec.size), np.float32)
    for _ in range(5):
        clf.backend.infer(x)
    ts = []
    for _ in range(int(job["iters"]) * 4):
        t = time.perf_counter()
        clf.backend.infer(x)
        ts.append(time.perf_counter() - t)
    res["infer_b1_p50_ms"] = _p50_ms(ts)
    ts = []   # the engine predict_one runs on (Backend.infer_one_async: OpenVINO's LATENCY compilation)
    for _ in range(int(job["iters"]) * 4 + 5):
        t = time.perf_counter()
        clf.backend.infer_one_async(x).result()
        ts.append(time.perf_counter() - t)
    res["infer_one_b1_p50_ms"] = _p50_ms(ts[5:])
    for kind, files in job["files"].items():
        dec, pre, one = [], [], []
        for _ in range(max(1, int(job["iters"]) // len(files))):
            for f in files:
                t0 = time.perf_counter()
                d = decode(f, min_side=spec.decode_hint())
                t1 = time.perf_counter()
                preprocess(d.pixels, spec)
                dec.append(t1 - t0)
                pre.append(time.perf_counter() - t1)
        clf.predict_one(files[0])
        for f in _cycle(files, int(job["iters"])):
            t = time.perf_counter()
            r = clf.predict_one(f)
            one.append(time.perf_counter() - t)
        items = _cycle(files, int(job["e2e_images"]))
        for _ in clf.stream(files[:2]):
            pass
        t = time.perf_counter()
        results = list(clf.stream(items))
        dt = time.perf_counter() - t
        first = results[:len(files)]
        res["kinds"][kind] = {
            "decode_p50_ms": _p50_ms(dec), "preprocess_p50_ms": _p50_ms(pre), "predict_one_p50_ms": _p50_ms(one),
            "predict_one_vs_infer_b1": _p50_ms(one) / res["infer_b1_p50_ms"],
            "predict_one_vs_infer_one_b1": _p50_ms(one) / res["infer_one_b1_p50_ms"],
            "classify_ips": len(items) / dt, "errors": sum(not r.ok for r in results),
            "labels": [r.label for r in first],
            "probabilities": [[r.probabilities[c] for c in clf.classes] if r.ok else None for r in first]}
    res["classes"] = clf.classes
    clf.close()
    return res


def _naive_open(path: str):
    """The 8-bit PIL image a user's script makes from one file."""
    from PIL import Image
    if path.lower().endswith(".dcm"):
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
        ds = pydicom.dcmread(path)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        arr = arr.astype(np.float64)
        arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = 1.0 - arr
        return Image.fromarray((arr * 255).astype(np.uint8))
    im = Image.open(path)
    if im.mode.startswith("I"):  # 16-bit PNG: what users do to get 8 bits
        a = np.asarray(im, np.float64)
        return Image.fromarray((a / 65535.0 * 255).astype(np.uint8))
    return im


def measure_naive(job: dict) -> dict:
    import torch

    from cxr_edge.backends import REGISTRY
    from cxr_edge.package import ModelPackage

    from .worker import reference_transform
    pkg = ModelPackage.read(job.get("model"), verify=False)
    net = REGISTRY["torch"](pkg, pkg.artifact("fp32", "onnx"), "fp32", job.get("threads")).net
    tf = reference_transform(pkg.preprocess)
    bs = int(job["batch_size"])
    res = {"torch_num_threads": torch.get_num_threads(), "kinds": {},
           "pipeline": "pydicom apply_modality_lut + apply_voi_lut (PNG/JPEG: PIL open) -> 8-bit PIL -> torchvision "
                       "Grayscale/Resize/ToTensor/Normalize -> torch eager fp32, batch %d, one process" % bs}

    def run(seq):
        outs = []
        with torch.inference_mode():
            for s in range(0, len(seq), bs):
                x = torch.stack([tf(_naive_open(p).convert("RGB")) for p in seq[s:s + bs]])
                outs.append(net(x).float().numpy())
        return np.concatenate(outs)

    for kind, files in job["files"].items():
        run(files[:2])
        items = _cycle(files, int(job["e2e_images"]))
        t = time.perf_counter()
        logits = run(items)
        dt = time.perf_counter() - t
        z = logits[:len(files)] - logits[:len(files)].max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        res["kinds"][kind] = {"classify_ips": len(items) / dt, "labels": [pkg.classes[i] for i in p.argmax(1)]}
    return res


JOBS = {"ours": measure_ours, "naive": measure_naive}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    try:
        res = {"status": "ok", **JOBS[job["mode"]](job)}
    except Exception as e:  # recorded, never raised: the other repetitions still count
        import traceback
        res = {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
    Path(job["result"]).write_text(json.dumps(res, default=float))
    return 0


# -- orchestration ------------------------------------------------------------------------------------
def _run(job: dict, work: Path, tag: str, timeout: float) -> dict:
    jf = work / f"{tag}.job.json"
    job = {**job, "result": str(work / f"{tag}.result.json")}
    jf.write_text(json.dumps(job))
    try:
        proc = subprocess.run([sys.executable, "-m", "cxr_edge.bench.station", str(jf)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    rf = Path(job["result"])
    if rf.is_file():
        return json.loads(rf.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "error", "error": f"job process died (exit {proc.returncode}): " + " | ".join(tail)}


def _stats(values) -> dict | None:
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    return {"median": float(np.median(v)), "min": min(v), "max": max(v), "n": len(v), "values": v}


def run_fullsize(model=None, data=None, out=None, repetitions: int = 3, images: int = 4, e2e_images: int = 24,
                 iters: int = 12, batch_size: int = 8, threads: int | None = None, naive: bool = True,
                 kinds=fullsize.KINDS, timeout: float = 1800, log=print) -> dict:
    """Build the workload, run `repetitions` alternating (ours, naive) pairs, return the report."""
    from cxr_edge.package import ModelPackage

    from .core import default_data
    from .host import host_info
    t0 = time.time()
    pkg = ModelPackage.read(model)
    src_dir = Path(data) if data else default_data()
    sources = sorted(p for p in src_dir.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not sources:
        raise ValueError(f"{src_dir}: no JPEG/PNG radiographs to build the full-size workload from")
    work = Path(tempfile.mkdtemp(prefix="cxr-fullsize-"))
    try:
        log(f"bench full-size: building {images} images x {len(kinds)} kinds at {fullsize.FULL_SIZE[0]}x"
            f"{fullsize.FULL_SIZE[1]} from {src_dir}")
        files = fullsize.build(sources, work / "inputs", n=images)
        files = {k: files[k] for k in kinds}
        base = {"model": str(pkg.root), "files": files, "batch_size": batch_size, "threads": threads,
                "e2e_images": e2e_images, "iters": iters}
        reps = []
        for r in range(repetitions):
            order = ["ours", "naive"] if r % 2 == 0 else ["naive", "ours"]
            rec = {}
            for mode in order:
                if mode == "naive" and not naive:
                    continue
                log(f"bench full-size: repetition {r + 1}/{repetitions}: {mode}")
                la = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                rec[mode] = _run({**base, "mode": mode}, work, f"r{r}-{mode}", timeout)
                rec[mode]["loadavg_1m_before"] = la
                if rec[mode]["status"] != "ok":
                    log(f"bench full-size: {mode}: ERROR {rec[mode]['error']}")
            reps.append(rec)
        report = {"report_kind": REPORT_KIND, "report_version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "seconds": round(time.time() - t0, 1),
                  "package": {"path": str(pkg.root), "name": pkg.name, "preprocess": pkg.preprocess.to_dict()},
                  "workload": {"sources": str(src_dir), "images_per_kind": images, "size": list(fullsize.FULL_SIZE),
                               "kinds": {k: fullsize.KIND_LABEL[k] for k in kinds}, "e2e_images": e2e_images,
                               "batch_size": batch_size, "iters": iters},
                  "repetitions": reps, "host": host_info(threads, None)}
        report["summary"] = summarise(reps, kinds)
        if out:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
            (out / "report.md").write_text(markdown(report))
            log(f"bench full-size: wrote {out / 'report.json'}, {out / 'report.md'}")
        return report
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def summarise(reps: list[dict], kinds) -> dict:
    """Per kind: median and min-max over repetitions of each measure and of the ratios."""
    s = {}
    ok = [r for r in reps if r.get("ours", {}).get("status") == "ok"]
    s["infer_b1_p50_ms"] = _stats([r["ours"]["infer_b1_p50_ms"] for r in ok])
    s["infer_one_b1_p50_ms"] = _stats([r["ours"]["infer_one_b1_p50_ms"] for r in ok
                                       if "infer_one_b1_p50_ms" in r["ours"]])   # reports before the one-input engine
    s["backend"] = ok[0]["ours"]["backend"] if ok else None
    for k in kinds:
        rows = [r["ours"]["kinds"][k] for r in ok if k in r["ours"].get("kinds", {})]
        ks = {m: _stats([row[m] for row in rows]) for m in
              ("decode_p50_ms", "preprocess_p50_ms", "predict_one_p50_ms", "predict_one_vs_infer_b1",
               "predict_one_vs_infer_one_b1", "classify_ips") if all(m in row for row in rows)}
        ks["labels"] = rows[-1]["labels"] if rows else None
        ks["errors"] = sum(row["errors"] for row in rows)
        ratios, naive_ips = [], []
        for r in reps:
            o, n = r.get("ours", {}), r.get("naive", {})
            if o.get("status") == "ok" and n.get("status") == "ok" and k in n.get("kinds", {}):
                ratios.append(o["kinds"][k]["classify_ips"] / n["kinds"][k]["classify_ips"])
                naive_ips.append(n["kinds"][k]["classify_ips"])
                ks["naive_labels"] = n["kinds"][k]["labels"]
        ks["naive_classify_ips"] = _stats(naive_ips)
        ks["vs_naive"] = _stats(ratios)
        s[k] = ks
    return s


def _mm(st, fmt="{:.1f}") -> str:
    if not st:
        return "–"
    return f"{fmt.format(st['median'])} ({fmt.format(st['min'])}–{fmt.format(st['max'])})"


def markdown(report: dict) -> str:
    s = report["summary"]
    w = report["workload"]
    L = [f"# cxr-edge bench --workload full-size: {report['package']['name']}", "",
         f"{w['size'][0]} x {w['size'][1]} inputs built from {w['sources']} ({w['images_per_kind']} per kind); "
         f"backend {s.get('backend')}; inference-only batch-1 p50 **{_mm(s.get('infer_b1_p50_ms'), '{:.2f}')} ms** "
         f"on the batched engine `classify` uses, {_mm(s.get('infer_one_b1_p50_ms'), '{:.2f}')} ms on the one-input "
         "engine `predict_one` uses (OpenVINO: THROUGHPUT / LATENCY compilations). "
         f"Each cell: median over {len(report['repetitions'])} alternating repetitions (min–max).", "",
         "| input | `predict_one` p50 ms | of which decode / preprocess ms | × infer b1 (batched engine) | "
         "× infer b1 (one-input engine) | `classify` img/s | naive img/s | × naive pipeline | labels (ours / naive) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for k, label in w["kinds"].items():
        ks = s.get(k) or {}
        dec, pre = ks.get("decode_p50_ms"), ks.get("preprocess_p50_ms")
        labels = ks.get("labels") or []
        nl = ks.get("naive_labels") or []
        L.append(f"| {label} | {_mm(ks.get('predict_one_p50_ms'))} | "
                 f"{_f(dec)} / {_f(pre)} | {_mm(ks.get('predict_one_vs_infer_b1'))} | "
                 f"{_mm(ks.get('predict_one_vs_infer_one_b1'))} | "
                 f"{_mm(ks.get('classify_ips'))} | {_mm(ks.get('naive_classify_ips'))} | "
                 f"**{_mm(ks.get('vs_naive'))}** | {','.join(labels)} / {','.join(nl)} |")
    L += ["", f"Naive pipeline: {next((r['naive'].get('pipeline') for r in report['repetitions'] if r.get('naive', {}).get('pipeline')), 'not run')}.",
          "Each pipeline runs in its own process; repetitions alternate which goes first.", ""]
    errs = [f"- repetition {i + 1} {m}: {r[m]['error']}" for i, r in enumerate(report["repetitions"]) for m in r
            if r[m].get("status") != "ok"]
    if errs:
        L += ["Errors:", ""] + errs + [""]
    return "\n".join(L)


def _f(st, fmt="{:.1f}"):
    return fmt.format(st["median"]) if st else "–"


if __name__ == "__main__":
    sys.exit(main())
