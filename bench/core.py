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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cxr_edge.decode import DecodeError
from cxr_edge.formats import TOLERANCES
from cxr_edge.labelled import class_index, item_fields, items_in_dir, iter_tensors
from cxr_edge.package import ModelPackage
from cxr_edge.nearties import sources_and_near_ties
from cxr_edge.parity import compare, judge

from . import worker
from .host import host_info
from .plan import Combo, plan

REPORT_VERSION = 1
REF_KEY = "torch/fp32"   # every combination's parity is measured against this one
TARGETS = {"e2e_vs_reference": 6.0, "e2e_vs_infer": 0.85, "predict_one_vs_infer_b1": 1.3}


@dataclass
class Timing:
    warmup: int
    min_iters: int
    min_seconds: float


def default_data() -> Path:
    from cxr_edge.samples import DIR   # installed with the package: works in an edge install too
    return DIR


def _load_items(data, limit: int | None, seed: int = 0) -> list:
    """The items of `data` (cxr_edge.labelled.items_in_dir: Samples of a dataset layout, else plain
    image paths), at most `limit` of them."""
    items = items_in_dir(data)
    if not items:
        raise ValueError(f"{data}: no images found")
    if limit and len(items) > limit:  # a deterministic spread over the whole set, not its first files
        idx = sorted(np.random.default_rng(seed).choice(len(items), limit, replace=False))
        items = [items[i] for i in idx]
    return items


@dataclass
class Prepared:
    """The benchmark images, decoded + preprocessed once into one raw float32 file that every job
    reads: `shape` (N, C, size, size); files, sources: N str ("" = source unknown); labels: (N,) int
    class indices, -1 = unlabelled; skipped: a message per unreadable file left out."""
    path: Path
    shape: tuple
    files: list
    labels: np.ndarray
    sources: list
    skipped: list


def _prepare(items, pkg, path: Path, log) -> Prepared:
    """Decode + preprocess exactly as the runtime does (cxr_edge.labelled); stream to `path`."""
    spec = pkg.preprocess
    files, labels, sources, skipped = [], [], [], []
    with open(path, "wb") as f:
        # ValueError too: an image too small to classify is left out, like an unreadable one
        for it, x in iter_tensors(items, spec, skipped, errors=(DecodeError, ValueError)):
            f.write(np.ascontiguousarray(x, np.float32).tobytes())
            file, label, source = item_fields(it)
            files.append(file)
            labels.append(class_index(label, pkg.classes))
            sources.append(source)
    if not files:
        raise ValueError("no decodable images in the benchmark data")
    if skipped:
        log(f"bench: {len(skipped)} unreadable files skipped (first: {skipped[0]})")
    shape = (len(files), spec.channels, spec.size, spec.size)
    return Prepared(path, shape, files, np.array(labels), sources, skipped)


def _loadavg():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _loadavgs():
    """The 1, 5 and 15-minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


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


@dataclass
class BenchOptions:
    """What `run_bench` measures, and for how long; the defaults are `cxr-edge bench`'s.

    backends, precisions: only these (None: all); the torch fp32 reference always runs.
    batch_sizes: inference-only batch sizes (None: [1, 8] with quick, else [1, 8, 32]); 1 and
        e2e_batch_size are always added (the ratios compare against them).
    quick: a minute or two: fewer repeats, shorter timing budget.
    limit: at most N images of the data (a deterministic spread over it).
    threads: inference threads for every backend (None: each backend's own).
    repeats: timed iterations per measurement (overrides the time budget).
    isolate: each job in its own subprocess, so peak RSS is that job's alone.
    soak, soak_every: also stream `soak` images through Classifier.stream, RSS every `soak_every`.
    reference: also measure the torchvision + torch eager pipeline a user would otherwise write.
    try_unavailable: attempt combinations this machine reports as unavailable (errors recorded).
    e2e_batch_size, e2e_images: Classifier batch size and images per end-to-end run (None: the
        whole set, at least 64 unless `repeats` is given).
    chart: draw throughput.png (needs matplotlib).
    timeout: seconds per job before it is recorded as failed (None: 600 with quick, else 3600).
    """
    backends: list | None = None
    precisions: list | None = None
    batch_sizes: list | None = None
    quick: bool = False
    limit: int | None = None
    threads: int | None = None
    repeats: int | None = None
    isolate: bool = True
    soak: int = 0
    soak_every: int = 200
    reference: bool = True
    try_unavailable: bool = False
    e2e_batch_size: int = 8
    e2e_images: int | None = None
    chart: bool = True
    timeout: float | None = None

    def resolved_batch_sizes(self) -> list[int]:
        """The inference-only batch sizes measured, ascending (defaults and 1 / e2e added)."""
        bs = self.batch_sizes if self.batch_sizes is not None else ([1, 8] if self.quick else [1, 8, 32])
        return sorted({int(b) for b in bs} | {1, int(self.e2e_batch_size)})

    def timing(self) -> Timing:
        """Warm-up and timed iterations per measurement."""
        if self.repeats:
            return Timing(warmup=1, min_iters=int(self.repeats), min_seconds=0.0)
        if self.quick:
            return Timing(warmup=1, min_iters=3, min_seconds=0.3)
        return Timing(warmup=2, min_iters=10, min_seconds=2.0)

    def job_timeout(self) -> float:
        """Seconds one job may run before it is recorded as failed."""
        return self.timeout or (600 if self.quick else 3600)


@dataclass
class _Run:
    """What every step of one benchmark run reads: the package, the prepared images, the fields
    every worker job shares (`base`), and the scratch directory jobs write into."""
    pkg: ModelPackage
    opts: BenchOptions
    data_dir: Path
    work: Path
    data: Prepared
    base: dict
    log: object

    def job(self, fields: dict, name: str, timeout: float | None = None) -> dict:
        """One worker job writing into work/`name`; its result dict (status "ok" or "error")."""
        job = {**self.base, **fields, "out_dir": str(self.work / name)}
        return _run_job(job, self.opts.isolate, timeout or self.opts.job_timeout(), self.log)


def run_bench(model=None, data=None, options: BenchOptions | None = None, out=None, log=print,
              **overrides) -> dict:
    """Benchmark a model package; write OUT/report.json, report.md and throughput.png when `out` is
    given; return the report dict. Failures of single combinations are recorded, never raised.

    model: package directory (None: the default model); data: a dataset directory or a folder of
    images (None: the packaged samples). options: a BenchOptions; keyword arguments override its
    fields (`run_bench(quick=True)`), an unknown one raises TypeError.
    """
    opts = replace(options or BenchOptions(), **overrides)
    t0, load_start = time.time(), _loadavgs()
    pkg = ModelPackage.read(model)
    work = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    try:
        run = _start(pkg, Path(data) if data else default_data(), opts, work, log)
        combos = plan(pkg, opts.backends, opts.precisions, opts.try_unavailable)
        probs = _measure_combinations(run, combos)
        torch_row = next((c for c in combos if c.reference), None)
        _add_parity(run, combos, probs, torch_row)
        _add_speedups(combos, torch_row)
        ref_pipe = _reference_pipeline(run, torch_row) if opts.reference else None
        auto = next((c for c in combos if c.auto), None)
        summary = _summary(combos, auto, ref_pipe, probs, run.data.labels, pkg)
        if ref_pipe:
            ref_pipe.pop("e2e_probs_file", None)
        soak_res = _soak(run) if opts.soak else None
        report = _report(run, combos, {"reference_pipeline": ref_pipe, "summary": summary, "soak": soak_res},
                         t0, load_start)
        if out:
            _write(report, Path(out), opts.chart, log)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _start(pkg, data_dir: Path, opts: BenchOptions, work: Path, log) -> _Run:
    """Prepare the images once and the fields every job shares; log what is benchmarked."""
    batch_sizes, timing = opts.resolved_batch_sizes(), opts.timing()
    prepared = _prepare(_load_items(data_dir, opts.limit), pkg, work / "tensors.f32", log)
    n = len(prepared.files)
    e2e_images = opts.e2e_images
    if e2e_images is None:
        # enough batches that pipeline fill and drain (first decode, last inference) do not dominate
        e2e_images = n if opts.repeats else max(n, 64)
    log(f"bench: {pkg.name} ({pkg.root}) on {n} images from {data_dir}; batch sizes {batch_sizes}")
    base = {"package": str(pkg.root), "tensors": str(prepared.path), "tensors_shape": list(prepared.shape),
            "files": prepared.files, "threads": opts.threads, "batch_sizes": batch_sizes,
            "timing": timing.__dict__, "e2e_batch_size": int(opts.e2e_batch_size), "e2e_images": int(e2e_images)}
    return _Run(pkg, opts, data_dir, work, prepared, base, log)


def _measure_combinations(run: _Run, combos: list[Combo]) -> dict:
    """Run every planned combination, the torch reference first; set each Combo's status, reason and
    results. Returns {key: (probs (N, K), end-to-end probs (N, K) or None)} for those that wrote them."""
    probs = {}
    for i, c in enumerate(sorted(combos, key=lambda c: not c.reference)):
        if c.status == "unavailable":
            run.log(f"bench: {c.key}: unavailable ({c.reason})")
            continue
        run.log(f"bench: {c.key} ({c.artifact})" + (f" [attempted although: {c.forced}]" if c.forced else ""))
        name = f"{i:02d}-{c.backend}-{c.precision}"
        res = run.job({"mode": "combination", "backend": c.backend, "precision": c.precision,
                       "artifact": c.artifact}, name)
        c.status = res.pop("status")
        if c.status != "ok":
            c.reason = res.get("error", "unknown error")
            run.log(f"bench: {c.key}: ERROR {c.reason}")
        c.results = res
        jd = run.work / name
        if (jd / "probs.npy").is_file():
            e2e = jd / "e2e_probs.npy"
            probs[c.key] = (np.load(jd / "probs.npy"), np.load(e2e) if e2e.is_file() else None)
    return probs


def _add_parity(run: _Run, combos: list[Combo], probs: dict, torch_row: Combo | None) -> None:
    """Parity against the torch fp32 reference on the same tensors, the bench gate, and how far each
    combination's end-to-end outputs are from its outputs on the prepared tensors."""
    ref = probs.get(REF_KEY, (None, None))[0]
    pkg = run.pkg
    for c in combos:
        if c.key not in probs:
            continue
        if ref is None:
            c.results["parity"] = None
            c.results["parity_note"] = "no torch fp32 reference: " + (torch_row.reason if torch_row else "torch row missing")
            continue
        tensor_p, e2e_p = probs[c.key]
        par = _parity(ref, tensor_p, run.data.labels, pkg)
        # per-source agreement and near-tie counts (cxr_edge.nearties)
        par.update(sources_and_near_ties(ref, tensor_p, run.data.sources, c.backend, c.precision))
        c.results["parity"] = par
        c.results["gate_bench"] = judge(par, c.precision if c.precision in TOLERANCES else "fp32",
                                        pkg.classes, pkg.normal_class, source="bench").to_dict()
        # e2e (Classifier.stream on files) against inference on the pre-made tensors: same pipeline?
        if e2e_p is not None and not np.isnan(e2e_p).any():
            c.results["e2e_vs_tensor_max_abs_dp"] = float(np.abs(e2e_p - tensor_p).max())


def _add_speedups(combos: list[Combo], torch_row: Combo | None) -> None:
    """Speed-ups against torch eager fp32 at the same batch size; e2e and single-image ratios."""
    torch_ok = torch_row is not None and torch_row.status == "ok"
    tinf = torch_row.results.get("infer", {}) if torch_ok else {}
    for c in combos:
        r = c.results
        if c.status != "ok":
            continue
        for bs, rec in r.get("infer", {}).items():
            rec["speedup_vs_torch"] = _ratio(rec["ips"], tinf.get(bs, {}).get("ips"))
        ebs = str(r["e2e"]["batch_size"])
        r["e2e"]["vs_infer"] = _ratio(r["e2e"]["ips"], r.get("infer", {}).get(ebs, {}).get("ips"))
        r["e2e"]["speedup_vs_torch_e2e"] = _ratio(r["e2e"]["ips"], torch_row.results.get("e2e", {}).get("ips")
                                                  if torch_ok else None)
        r["predict_one"]["vs_infer_b1"] = _ratio(r["predict_one"].get("p50_ms"),
                                                 r.get("infer", {}).get("1", {}).get("p50_ms"))


def _reference_pipeline(run: _Run, torch_row: Combo | None) -> dict:
    """The pipeline a user would otherwise write (torchvision transforms + torch eager fp32). Its
    result carries "e2e_probs_file" (for the summary) when it wrote probabilities."""
    if torch_row is None or torch_row.status == "unavailable":
        return {"status": "unavailable", "error": torch_row.reason if torch_row else "torch not planned"}
    run.log("bench: reference pipeline (torchvision transforms + torch eager fp32)")
    res = run.job({"mode": "reference"}, "reference")
    pf = run.work / "reference" / "e2e_probs.npy"
    if pf.is_file():
        res["e2e_probs_file"] = str(pf)
    return res


def _soak(run: _Run) -> dict:
    """Stream opts.soak images through Classifier.stream (auto), RSS every opts.soak_every."""
    o = run.opts
    run.log(f"bench: soak: {o.soak} images through Classifier.stream (auto), RSS every {o.soak_every}")
    return run.job({"mode": "soak", "soak": int(o.soak), "soak_every": int(o.soak_every)}, "soak",
                   max(o.job_timeout(), 3600))


def _host(run: _Run, combos: list[Combo], load_start) -> dict:
    """host_info with the decode workers the runs used and the load averages around the run."""
    decode_workers = next((c.results["e2e"]["decode_workers"] for c in combos
                           if c.status == "ok" and "e2e" in c.results), None)
    host = host_info(run.opts.threads, decode_workers)
    host["loadavg_start"] = load_start
    host["loadavg_end"] = _loadavgs()
    return host


def _settings(run: _Run) -> dict:
    """The report's "settings": what was asked, as resolved for this run."""
    o, b = run.opts, run.base
    return {"quick": o.quick, "batch_sizes": b["batch_sizes"], "timing": b["timing"],
            "e2e_batch_size": b["e2e_batch_size"], "e2e_images": b["e2e_images"],
            "isolate": o.isolate, "threads": o.threads, "try_unavailable": o.try_unavailable,
            "rss_mode": ("per combination: each measured in its own subprocess (peak_rss_mb = its "
                         "ru_maxrss; peak_rss_delta_mb = peak minus RSS after imports)") if o.isolate else
                        "in-process: peak_rss_delta_mb = sampled peak minus RSS at the job's start"}


def _report(run: _Run, combos: list[Combo], results: dict, t0: float, load_start) -> dict:
    """The report dict (report.json; REPORT_VERSION says its shape); `results`: its
    "reference_pipeline", "summary" and "soak" entries."""
    pkg, d = run.pkg, run.data
    host = _host(run, combos, load_start)
    return {
        "report_version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - t0, 1),
        "package": {"path": str(pkg.root), "name": pkg.name, "classes": pkg.classes,
                    "normal_class": pkg.normal_class, "preprocess": pkg.preprocess.to_dict(),
                    "artifacts": [{"file": a.file, "precision": a.precision, "format": a.format,
                                   "bytes": a.bytes} for a in pkg.artifacts]},
        "data": {"path": str(run.data_dir), "images": len(d.files), "labelled": int((d.labels >= 0).sum()),
                 "skipped": d.skipped, "limit": run.opts.limit},
        "settings": _settings(run),
        "host": host,
        "reference_key": REF_KEY,
        "records": [c.to_dict() for c in combos],
        **results,
    }


def _write(report: dict, out_dir: Path, chart: bool, log) -> None:
    """report.json, report.md and (with matplotlib) throughput.png in out_dir."""
    from .report import write_all
    charted = write_all(report, out_dir, chart=chart)
    log(f"bench: wrote {out_dir / 'report.json'}, {out_dir / 'report.md'}"
        + (f", {out_dir / 'throughput.png'}" if charted else
           " (no chart: matplotlib is not installed)" if chart else ""))


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
