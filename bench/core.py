"""`run_bench`: every available (backend, precision) of a model package, side by side.

Per combination (each in its own process by default, so peak RSS is that combination's alone):
artifact size; load time cold and warm (OpenVINO with its cache_dir option); inference-only
throughput and latency p50/p90/p99 per batch size; end-to-end throughput of the real
Classifier.stream on real files; warm single-image latency with decode (predict_one); peak RSS;
and, on labelled data, accuracy and parity against the torch fp32 reference via parity.compare.
Plus the torchvision reference pipeline a user would otherwise write, and an optional soak run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_edge.decode import DecodeError, decode
from cxr_edge.formats import TOLERANCES
from cxr_edge.package import ModelPackage
from cxr_edge.nearties import sources_and_near_ties
from cxr_edge.parity import compare, judge
from cxr_edge.preprocess import preprocess

from . import worker
from .host import host_info
from .plan import Combo, plan

REPORT_VERSION = 1
TARGETS = {"e2e_vs_reference": 6.0, "e2e_vs_infer": 0.85, "predict_one_vs_infer_b1": 1.3}


@dataclass
class Timing:
    warmup: int
    min_iters: int
    min_seconds: float


def default_data() -> Path:
    from cxr_edge.samples import DIR   # installed with the package: works in an edge install too
    return DIR


def _load_items(data, limit: int | None, seed: int = 0) -> list[tuple[str, str | None]]:
    """(path, label or None): a dataset layout train/data understands, else a plain folder of images."""
    p = Path(data)
    if not p.is_dir():
        raise FileNotFoundError(f"{data}: data directory not found")
    items = None
    try:
        from cxr_edge.train.data import load_dataset
        items = [(s.path, s.label) for s in load_dataset(p)]
    except Exception:
        items = None
    if not items:
        from cxr_edge.inputs import expand_inputs
        items = [(f, None) for f in expand_inputs([str(p)], recursive=True)]
    if not items:
        raise ValueError(f"{data}: no images found")
    if limit and len(items) > limit:  # a deterministic spread over the whole set, not its first files
        idx = sorted(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = [items[i] for i in idx]
    return items


def _sources(data, files) -> list[str]:
    """The data source of each benchmarked file ("" where unknown; [] when the layout has none)."""
    try:
        from cxr_edge.train.data import load_dataset
        by_path = {str(s.path): s.source or "" for s in load_dataset(Path(data))}
    except Exception:
        return []
    return [by_path.get(str(f), "") for f in files]


def _prepare(items, pkg, path: Path, log):
    """Decode + preprocess exactly as the runtime does; write the tensors to one raw float32 file."""
    spec = pkg.preprocess
    files, labels, skipped, n = [], [], [], 0
    with open(path, "wb") as f:
        for file, label in items:
            try:
                x = preprocess(decode(file, min_side=spec.decode_hint()).pixels, spec)
            except (DecodeError, ValueError) as e:
                skipped.append(str(e))
                continue
            f.write(np.ascontiguousarray(x, np.float32).tobytes())
            files.append(str(file))
            labels.append(pkg.classes.index(label) if label in pkg.classes else -1)
            n += 1
    if not files:
        raise ValueError("no decodable images in the benchmark data")
    if skipped:
        log(f"bench: {len(skipped)} unreadable files skipped (first: {skipped[0]})")
    shape = (n, spec.channels, spec.size, spec.size)
    return files, np.array(labels), skipped, shape


def _loadavg():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _run_job(job: dict, isolate: bool, timeout: float, log) -> dict:
    """One job; its result carries the 1-minute load average before and after (shared machines)."""
    before = _loadavg()
    res = _run_job_inner(job, isolate, timeout, log)
    res["loadavg_1m"] = [before, _loadavg()]
    return res


def _run_job_inner(job: dict, isolate: bool, timeout: float, log) -> dict:
    Path(job["out_dir"]).mkdir(parents=True, exist_ok=True)
    if not isolate:
        sampler_note = "in-process: sampled peak RSS minus RSS at the start of the job (other jobs' memory may linger)"
        res = worker.run_job(job, log)
        if "peak_rss_sampled_mb" in res:
            res["peak_rss_delta_mb"] = res["peak_rss_sampled_mb"] - res.get("rss_start_mb", 0)
        res["rss_mode"] = sampler_note
        return res
    jf = Path(job["out_dir"]) / "job.json"
    jf.write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "cxr_edge.bench.worker", str(jf)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stderr.splitlines():
        if line.startswith("  "):
            log(line)
    rf = Path(job["out_dir"]) / "result.json"
    if rf.is_file():
        res = json.loads(rf.read_text())
        if "peak_rss_mb" in res and "rss_baseline_mb" in res:
            res["peak_rss_delta_mb"] = res["peak_rss_mb"] - res["rss_baseline_mb"]
        return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    return {"status": "error", "error": f"worker process died ({how}): " + " | ".join(tail)}


def _parity(ref, probs, labels, pkg) -> dict:
    """parity.compare on all images, accuracy fields from the labelled subset -> the report's dict
    (ParityStats.to_dict keys)."""
    par = compare(ref, probs, None, pkg.classes, pkg.normal_class)
    m = labels >= 0
    if m.any():
        lab = compare(ref[m], probs[m], labels[m], pkg.classes, pkg.normal_class)
        par.accuracy, par.ref_accuracy, par.accuracy_delta = lab.accuracy, lab.ref_accuracy, lab.accuracy_delta
        par.recall_delta, par.newly_called_normal = lab.recall_delta, lab.newly_called_normal
        par.labelled_n = int(m.sum())
    return par.to_dict()


def _ratio(a, b):
    return float(a / b) if a is not None and b else None


def run_bench(model=None, data=None, backends=None, precisions=None, batch_sizes=None, quick: bool = False,
              out=None, limit: int | None = None, threads: int | None = None, repeats: int | None = None,
              isolate: bool = True, soak: int = 0, soak_every: int = 200, reference: bool = True,
              try_unavailable: bool = False, e2e_batch_size: int = 8, e2e_images: int | None = None,
              chart: bool = True, timeout: float | None = None, log=print) -> dict:
    """Benchmark a model package; write DIR/report.json, report.md and throughput.png when `out` is
    given; return the report dict. Failures of single combinations are recorded, never raised."""
    t0 = time.time()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    pkg = ModelPackage.read(model)
    data = Path(data) if data else default_data()
    if batch_sizes is None:
        batch_sizes = [1, 8] if quick else [1, 8, 32]
    batch_sizes = sorted({int(b) for b in batch_sizes} | {1, int(e2e_batch_size)})  # 1 and e2e are compared against
    if repeats:
        timing = Timing(warmup=1, min_iters=int(repeats), min_seconds=0.0)
    elif quick:
        timing = Timing(warmup=1, min_iters=3, min_seconds=0.3)
    else:
        timing = Timing(warmup=2, min_iters=10, min_seconds=2.0)
    timeout = timeout or (600 if quick else 3600)

    out_dir = Path(out) if out else None
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        items = _load_items(data, limit)
        files, labels, skipped, shape = _prepare(items, pkg, work / "tensors.f32", log)
        if e2e_images is None:
            # enough batches that pipeline fill and drain (first decode, last inference) do not dominate
            e2e_images = len(files) if repeats else max(len(files), 64)
        log(f"bench: {pkg.name} ({pkg.root}) on {len(files)} images from {data}; batch sizes {batch_sizes}")
        combos = plan(pkg, backends, precisions, try_unavailable)
        base = {"package": str(pkg.root), "tensors": str(work / "tensors.f32"), "tensors_shape": list(shape),
                "files": files, "threads": threads, "batch_sizes": batch_sizes, "timing": timing.__dict__,
                "e2e_batch_size": int(e2e_batch_size), "e2e_images": int(e2e_images)}

        sources = _sources(data, files)
        probs = {}
        for i, c in enumerate(sorted(combos, key=lambda c: not c.reference)):
            if c.status == "unavailable":
                log(f"bench: {c.key}: unavailable ({c.reason})")
                continue
            log(f"bench: {c.key} ({c.artifact})" + (f" [attempted although: {c.forced}]" if c.forced else ""))
            jd = work / f"{i:02d}-{c.backend}-{c.precision}"
            res = _run_job({**base, "mode": "combination", "backend": c.backend, "precision": c.precision,
                            "artifact": c.artifact, "out_dir": str(jd)}, isolate, timeout, log)
            c.status = res.pop("status")
            if c.status != "ok":
                c.reason = res.get("error", "unknown error")
                log(f"bench: {c.key}: ERROR {c.reason}")
            c.results = res
            if (jd / "probs.npy").is_file():
                probs[c.key] = (np.load(jd / "probs.npy"), np.load(jd / "e2e_probs.npy") if (jd / "e2e_probs.npy").is_file() else None)

        # parity against the torch fp32 reference, on the same tensors
        ref_key = "torch/fp32"
        ref = probs.get(ref_key, (None, None))[0]
        torch_row = next((c for c in combos if c.reference), None)
        for c in combos:
            if c.key not in probs:
                continue
            if ref is None:
                c.results["parity"] = None
                c.results["parity_note"] = "no torch fp32 reference: " + (torch_row.reason if torch_row else "torch row missing")
                continue
            par = _parity(ref, probs[c.key][0], labels, pkg)
            if isinstance(par, dict):  # per-source agreement and near-tie counts (cxr_edge.nearties)
                par.update(sources_and_near_ties(ref, probs[c.key][0], sources, c.backend, c.precision))
            c.results["parity"] = par
            c.results["gate_bench"] = judge(par, c.precision if c.precision in TOLERANCES else "fp32",
                                            pkg.classes, pkg.normal_class, source="bench").to_dict()
            # e2e (Classifier.stream on files) against inference on the pre-made tensors: same pipeline?
            e2e_p = probs[c.key][1]
            if e2e_p is not None and not np.isnan(e2e_p).any():
                c.results["e2e_vs_tensor_max_abs_dp"] = float(np.abs(e2e_p - probs[c.key][0]).max())

        # speed-ups against torch eager fp32 at the same batch size; e2e and single-image ratios
        tinf = (torch_row.results.get("infer", {}) if torch_row and torch_row.status == "ok" else {})
        for c in combos:
            r = c.results
            if c.status != "ok":
                continue
            for bs, rec in r.get("infer", {}).items():
                rec["speedup_vs_torch"] = _ratio(rec["ips"], tinf.get(bs, {}).get("ips"))
            ebs = str(r["e2e"]["batch_size"])
            r["e2e"]["vs_infer"] = _ratio(r["e2e"]["ips"], r.get("infer", {}).get(ebs, {}).get("ips"))
            r["e2e"]["speedup_vs_torch_e2e"] = _ratio(r["e2e"]["ips"], torch_row.results.get("e2e", {}).get("ips")
                                                      if torch_row and torch_row.status == "ok" else None)
            r["predict_one"]["vs_infer_b1"] = _ratio(r["predict_one"].get("p50_ms"),
                                                     r.get("infer", {}).get("1", {}).get("p50_ms"))

        # the pipeline a user would otherwise write
        ref_pipe = None
        if reference:
            ok_torch = torch_row is not None and torch_row.status != "unavailable"
            if not ok_torch:
                ref_pipe = {"status": "unavailable", "error": torch_row.reason if torch_row else "torch not planned"}
            else:
                log("bench: reference pipeline (torchvision transforms + torch eager fp32)")
                jd = work / "reference"
                ref_pipe = _run_job({**base, "mode": "reference", "out_dir": str(jd)}, isolate, timeout, log)
                if (jd / "e2e_probs.npy").is_file():
                    ref_pipe["e2e_probs_file"] = str(jd / "e2e_probs.npy")

        auto = next((c for c in combos if c.auto), None)
        summary = _summary(combos, auto, ref_pipe, probs, labels, pkg)
        if ref_pipe:
            ref_pipe.pop("e2e_probs_file", None)

        soak_res = None
        if soak:
            log(f"bench: soak: {soak} images through Classifier.stream (auto), RSS every {soak_every}")
            soak_res = _run_job({**base, "mode": "soak", "soak": int(soak), "soak_every": int(soak_every),
                                 "out_dir": str(work / "soak")}, isolate, max(timeout, 3600), log)

        decode_workers = next((c.results["e2e"]["decode_workers"] for c in combos
                               if c.status == "ok" and "e2e" in c.results), None)
        host = host_info(threads, decode_workers)
        host["loadavg_start"] = load_start
        host["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        report = {
            "report_version": REPORT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - t0, 1),
            "package": {"path": str(pkg.root), "name": pkg.name, "classes": pkg.classes,
                        "normal_class": pkg.normal_class, "preprocess": pkg.preprocess.to_dict(),
                        "artifacts": [{"file": a.file, "precision": a.precision, "format": a.format,
                                       "bytes": a.bytes} for a in pkg.artifacts]},
            "data": {"path": str(data), "images": len(files), "labelled": int((labels >= 0).sum()),
                     "skipped": skipped, "limit": limit},
            "settings": {"quick": quick, "batch_sizes": batch_sizes, "timing": timing.__dict__,
                         "e2e_batch_size": int(e2e_batch_size), "e2e_images": int(e2e_images),
                         "isolate": isolate, "threads": threads, "try_unavailable": try_unavailable,
                         "rss_mode": ("per combination: each measured in its own subprocess (peak_rss_mb = its "
                                      "ru_maxrss; peak_rss_delta_mb = peak minus RSS after imports)") if isolate else
                                     "in-process: peak_rss_delta_mb = sampled peak minus RSS at the job's start"},
            "host": host,
            "reference_key": ref_key,
            "records": [c.to_dict() for c in combos],
            "reference_pipeline": ref_pipe,
            "summary": summary,
            "soak": soak_res,
        }
        if out_dir:
            from .report import write_all
            charted = write_all(report, out_dir, chart=chart)
            log(f"bench: wrote {out_dir / 'report.json'}, {out_dir / 'report.md'}"
                + (f", {out_dir / 'throughput.png'}" if charted else
                   " (no chart: matplotlib is not installed)" if chart else ""))
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _summary(combos: list[Combo], auto: Combo | None, ref_pipe, probs, labels, pkg) -> dict:
    """The three targets, measured side by side in this run."""
    s = {"auto": auto.key if auto else None, "targets": TARGETS}
    if auto is None or auto.status != "ok":
        s["note"] = ("auto's choice was not measured in this run" if auto else
                     "auto's choice is not among the measured combinations (filtered out, or nothing usable)")
        return s
    r = auto.results
    s["auto_e2e_ips"] = r["e2e"]["ips"]
    s["auto_e2e_vs_infer"] = r["e2e"].get("vs_infer")
    s["auto_predict_one_vs_infer_b1"] = r["predict_one"].get("vs_infer_b1")
    if ref_pipe and ref_pipe.get("status") == "ok":
        s["reference_ips"] = ref_pipe["e2e"]["ips"]
        s["auto_vs_reference"] = _ratio(r["e2e"]["ips"], ref_pipe["e2e"]["ips"])
        pf = ref_pipe.get("e2e_probs_file")
        ae = probs.get(auto.key, (None, None))[1]
        if pf and ae is not None:
            rp = np.load(pf)
            ok = ~np.isnan(ae).any(1)
            s["auto_vs_reference_top1_agreement"] = float((rp[ok].argmax(1) == ae[ok].argmax(1)).mean())
            s["auto_vs_reference_max_abs_dp"] = float(np.abs(rp[ok] - ae[ok]).max())
            m = ok & (labels >= 0)
            if m.any():
                s["reference_pipeline_accuracy"] = float((rp[m].argmax(1) == labels[m]).mean())
                s["auto_e2e_accuracy"] = float((ae[m].argmax(1) == labels[m]).mean())
    checks = {}
    if s.get("auto_vs_reference") is not None:
        checks["e2e_vs_reference"] = s["auto_vs_reference"] >= TARGETS["e2e_vs_reference"]
    if s.get("auto_e2e_vs_infer") is not None:
        checks["e2e_vs_infer"] = s["auto_e2e_vs_infer"] >= TARGETS["e2e_vs_infer"]
    if s.get("auto_predict_one_vs_infer_b1") is not None:
        checks["predict_one_vs_infer_b1"] = s["auto_predict_one_vs_infer_b1"] <= TARGETS["predict_one_vs_infer_b1"]
    s["met"] = checks
    return s
