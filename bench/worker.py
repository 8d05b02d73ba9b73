"""One measurement job: a (backend, precision) combination, the torchvision reference pipeline, or a
soak run. Run in its own process (`python -m cxr_edge.bench.worker JOB.json`) so that peak RSS
belongs to that job alone, or in-process (`run_job`) where isolation is not wanted.

A job is a JSON-able dict written by `bench.core`; the result is a JSON-able dict plus .npy files
(probabilities) in the job's directory. This module imports no torch unless the job needs it.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np


# -- small helpers ------------------------------------------------------------------------------
def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


def ru_maxrss() -> int:
    """Peak RSS of this process so far, bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v if sys.platform == "darwin" else v * 1024


class RssSampler:
    """Samples RSS in a background thread: peak over a window, for in-process measurements."""

    def __init__(self, period: float = 0.02):
        self.period, self.start, self.peak = period, _rss(), _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())
        return self.peak


def percentiles_ms(seconds: list) -> dict:
    a = np.asarray(seconds, np.float64) * 1e3
    if not a.size:
        return {}
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "min_ms": float(a.min()), "n": int(a.size)}


def softmax(logits: np.ndarray) -> np.ndarray:
    from cxr_edge.postprocess import softmax as sm
    return sm(logits)


class TensorFile:
    """The preprocessed parity set as one raw float32 file, read chunk by chunk into ordinary
    memory (not mmap: mapped pages would count towards the combination's RSS)."""

    def __init__(self, path, shape):
        self.path, self.shape = Path(path), tuple(shape)
        self.per = int(np.prod(self.shape[1:]))

    def __len__(self):
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.shape[0])
        with open(self.path, "rb") as f:
            f.seek(start * self.per * 4)
            a = np.fromfile(f, np.float32, (stop - start) * self.per)
        return a.reshape((stop - start,) + self.shape[1:])

    def batch(self, n: int, offset: int = 0) -> np.ndarray:
        """n tensors, cycling through the set if it is smaller than n."""
        k = min(n, len(self))
        base = self.read(0, k) if offset == 0 else self.read(offset, offset + k)
        if len(base) < n:
            base = base[np.arange(n) % len(base)]
        return np.ascontiguousarray(base)


def _timed_loop(fn, min_iters: int, min_seconds: float, warmup: int) -> list:
    for _ in range(warmup):
        fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < min_iters or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= max(min_iters, 1) * 50:  # a safety cap for very fast calls
            break
    return times


def _package(job):
    from cxr_edge.package import ModelPackage
    return ModelPackage.read(job["package"], verify=False)


def _threads_info(backend) -> dict:
    info = {"threads_requested": backend.threads}
    name = backend.name
    try:
        if name == "openvino":
            import openvino.properties as props
            info["inference_num_threads"] = int(backend.compiled.get_property(props.inference_num_threads))
            info["infer_requests"] = int(backend.nireq)
            info["streams"] = str(backend.compiled.get_property("NUM_STREAMS"))
            info["effective_precision"] = backend.effective_precision
        elif name == "torch":
            info["torch_num_threads"] = int(backend.torch.get_num_threads())
        elif name == "onnxruntime":
            so = backend.session.get_session_options()
            info["intra_op_num_threads"] = int(so.intra_op_num_threads)  # 0 = ORT's default (physical cores)
            info["providers"] = backend.session.get_providers()
    except Exception as e:  # informative only
        info["error"] = str(e)
    return info


# -- combination --------------------------------------------------------------------------------
# each backend's own libraries, imported before the RSS baseline so 'delta' is the model's share
_BACKEND_LIBRARIES = {"openvino": ("openvino",), "onnxruntime": ("onnxruntime",), "torch": ("torch", "torchvision"),
                      "tensorrt": ("tensorrt",)}


def measure_combination(job: dict, log=lambda m: None, res: dict | None = None) -> dict:
    """Everything for one (backend, precision): load times, inference-only throughput/latency per
    batch size, parity probabilities, end-to-end Classifier.stream, predict_one latency, RSS.
    `res` (filled in place, "stage" naming the step under way) keeps what was measured if a step raises."""
    from cxr_edge.backends import REGISTRY

    out_dir = Path(job["out_dir"])
    t_imp = time.perf_counter()
    backend_name, precision = job["backend"], job["precision"]
    cls = REGISTRY[backend_name]
    pkg = _package(job)
    art = next(a for a in pkg.artifacts if a.file == job["artifact"])
    for lib in _BACKEND_LIBRARIES.get(backend_name, ()):
        __import__(lib)
    res = {} if res is None else res
    res.update({"import_s": time.perf_counter() - t_imp, "rss_baseline_mb": _rss() / 2**20, "stage": "load"})
    sampler = RssSampler()
    threads = job.get("threads")
    # OpenVINO loads with an (initially empty) cache_dir; other backends take no options
    cache = Path(tempfile.mkdtemp(prefix="ov-cache-", dir=out_dir))
    options = {"cache_dir": str(cache)} if backend_name == "openvino" else {}
    b = _load_backend(functools.partial(cls, pkg, art, precision, threads), options, res, log)

    res["stage"] = "parity"
    tf = TensorFile(job["tensors"], job["tensors_shape"])
    _save_parity_probs(b, tf, out_dir / "probs.npy")
    res["stage"] = "infer"
    res["infer"] = _measure_infer(b, tf, job["batch_sizes"], job["timing"], log)
    b.close()
    del b
    res["peak_rss_engine_mb"] = sampler.peak / 2**20  # before the Classifier: the engine's own share

    res["stage"] = "e2e"
    clf = _load_classifier(pkg, art, job, options, res)
    _measure_e2e(clf, job, out_dir / "e2e_probs.npy", res, log)
    res["stage"] = "predict_one"
    res["predict_one"] = _measure_predict_one(clf, job["files"], job["timing"])
    clf.close()
    del clf

    res["peak_rss_sampled_mb"] = sampler.stop() / 2**20
    res["rss_start_mb"] = sampler.start / 2**20
    del res["stage"]
    return res


def _load_backend(load, options: dict, res: dict, log):
    """Load times into `res`: cold = first load in a fresh process, no cache option (what `classify`
    does today); with options (OpenVINO), a second load fills the empty cache_dir; warm = a load that
    finds it populated. load(options) -> backend. Returns the warm-loaded backend, which the next
    steps measure."""
    t = time.perf_counter()
    b = load({})
    res["load_cold_s"] = time.perf_counter() - t
    res["describe"] = b.describe()
    b.close()
    del b
    if options:
        t = time.perf_counter()
        b = load(dict(options))
        res["load_cache_fill_s"] = time.perf_counter() - t
        b.close()
        del b
    t = time.perf_counter()
    b = load(dict(options))
    res["load_warm_s"] = time.perf_counter() - t
    res["load_warm_note"] = ("options={'cache_dir': ...} already populated (compiled blob imported)" if options
                             else "second load in the same process (files in the OS page cache)")
    res["threads"] = _threads_info(b)
    res["device"] = b.device
    log(f"  loaded {b.describe()}: cold {res['load_cold_s']:.2f}s warm {res['load_warm_s']:.2f}s")
    return b


def _save_parity_probs(b, tf: TensorFile, path: Path, chunk: int = 16) -> None:
    """Probabilities (N, K) of the backend on the whole preprocessed set, saved as .npy."""
    logits = [b.infer(tf.read(i, i + chunk))["logits"] for i in range(0, len(tf), chunk)]
    np.save(path, softmax(np.concatenate(logits)))


def _measure_infer(b, tf: TensorFile, batch_sizes: list, timing: dict, log) -> dict:
    """Inference only, per batch size: sync latency percentiles and img/s; async throughput where
    the backend pipelines requests ("ips" is the better of the two). Keyed by str(batch size)."""
    per_bs = {}
    for bs in batch_sizes:
        x = tf.batch(bs)
        times = _timed_loop(functools.partial(b.infer, x), timing["min_iters"], timing["min_seconds"],
                            timing["warmup"])
        rec = percentiles_ms(times)
        rec["sync_ips"] = bs * len(times) / sum(times)
        rec["ips"] = rec["sync_ips"]
        depth = int(getattr(b, "nireq", 1) or 1)
        if b.supports_async and depth > 1:
            rec["async_ips"] = _async_ips(b, x, bs, depth, timing)
            rec["async_depth"] = depth
            rec["ips"] = max(rec["sync_ips"], rec["async_ips"])
        per_bs[str(bs)] = rec
        log(f"  infer bs {bs}: {rec['ips']:.1f} img/s, p50 {rec['p50_ms']:.1f} ms")
    return per_bs


def _async_ips(b, x: np.ndarray, bs: int, depth: int, timing: dict) -> float:
    """Images per second with up to `depth` asynchronous requests in flight."""
    from collections import deque
    n_batches = max(timing["min_iters"], 2 * depth)
    for _ in range(max(1, timing["warmup"])):
        b.infer(x)
    q, t = deque(), time.perf_counter()
    for _ in range(n_batches):
        if len(q) >= depth:  # never ask for more requests than exist (infer_async blocks)
            q.popleft().result()
        q.append(b.infer_async(x))
    while q:
        q.popleft().result()
    return bs * n_batches / (time.perf_counter() - t)


def _load_classifier(pkg, art, job: dict, options: dict, res: dict):
    """The real Classifier for the end-to-end runs, loaded the way a user would (plus the options the
    bench needs); load time and notes go into `res`."""
    import copy

    import cxr_edge
    backend_name, precision = job["backend"], job["precision"]
    epkg = copy.deepcopy(pkg)
    eart = next(a for a in epkg.artifacts if a.file == art.file)
    if backend_name != "torch" and not eart.passed_for(backend_name, precision):
        # load() only opens gated artifacts; the bench measures failed ones too, said so in the row
        res["e2e_note"] = "gate not passed in model.json: loaded with options ignore_gate"
    torch_before = "torch" in sys.modules
    t = time.perf_counter()
    # the bench measures parity itself: load without on-device verification or gate refusal
    clf = cxr_edge.load(epkg, backend=backend_name, precision=precision, batch_size=int(job["e2e_batch_size"]),
                        threads=job.get("threads"), options=dict(options, ignore_gate=True, verify=False))
    res["e2e_load_s"] = time.perf_counter() - t
    if not torch_before and "torch" in sys.modules:
        res["e2e_note"] = (res.get("e2e_note", "") + "; " if res.get("e2e_note") else "") + \
            "cxr_edge.load imported torch (backend availability checks) although this backend does not use it"
    return clf


def _measure_e2e(clf, job: dict, probs_path: Path, res: dict, log) -> None:
    """End to end: the real Classifier on real files (decode + preprocess + infer + softmax), cycling
    the files for e2e_images; res["e2e"], and each file's first probabilities (N, K, NaN where it
    failed) saved as .npy."""
    files, timing = job["files"], job["timing"]
    ebs, n_e2e = int(job["e2e_batch_size"]), int(job["e2e_images"])
    stream_items = [files[i % len(files)] for i in range(n_e2e)]
    warm = [files[i % len(files)] for i in range(min(n_e2e, ebs * timing["warmup"]))]
    for _ in clf.stream(warm):
        pass
    first, errors = {}, 0
    t = time.perf_counter()
    for i, r in enumerate(clf.stream(stream_items)):
        if not r.ok:
            errors += 1
        if i < len(files) and r.ok:
            first[i] = [r.probabilities[c] for c in clf.classes]
    dt = time.perf_counter() - t
    res["e2e"] = {"images": n_e2e, "seconds": dt, "ips": n_e2e / dt, "batch_size": ebs, "errors": errors,
                  "decode_workers": clf.decode_workers, "why": clf.why}
    probs = np.full((len(files), len(clf.classes)), np.nan)
    for i, p in first.items():
        probs[i] = p
    np.save(probs_path, probs)
    log(f"  e2e: {res['e2e']['ips']:.1f} img/s over {n_e2e} images")


def _measure_predict_one(clf, files: list, timing: dict) -> dict:
    """Warm single-image latency with decode (predict_one), percentiles in ms."""
    for f in files[:max(1, timing["warmup"])]:
        clf.predict_one(f)
    lat = []
    for i in range(max(timing["min_iters"], 3)):
        t = time.perf_counter()
        clf.predict_one(files[i % len(files)])
        lat.append(time.perf_counter() - t)
    return percentiles_ms(lat)


# -- the pipeline a user would otherwise write ----------------------------------------------------
def reference_transform(spec):
    """torchvision transforms equivalent to the package's preprocessing spec (8-bit PIL path)."""
    from torchvision import transforms as T
    if spec.resize == "stretch":
        resize = [T.Resize((spec.size, spec.size))]
    else:
        resize = [T.Resize(spec.resize_size), T.CenterCrop(spec.size)]
    gray = [T.Grayscale(num_output_channels=spec.channels)]
    return T.Compose(gray + resize + [T.ToTensor(), T.Normalize(list(spec.mean), list(spec.std))])


def measure_reference(job: dict, log=lambda m: None) -> dict:
    """PIL open -> Grayscale -> Resize -> ToTensor -> Normalize -> torch eager fp32, batch by batch
    in one loop (no DataLoader workers): the script a user writes without cxr-edge."""
    import torch
    from PIL import Image

    from cxr_edge.backends import REGISTRY
    out_dir = Path(job["out_dir"])
    pkg = _package(job)
    art = pkg.artifact("fp32", "onnx")
    res = {"rss_baseline_mb": _rss() / 2**20}
    sampler = RssSampler()
    t = time.perf_counter()
    net = REGISTRY["torch"](pkg, art, "fp32", job.get("threads")).net  # same weights as the torch row
    res["load_s"] = time.perf_counter() - t
    res["torch_num_threads"] = torch.get_num_threads()
    tf = reference_transform(pkg.preprocess)
    files = job["files"]
    ebs = int(job["e2e_batch_size"])
    n = int(job["e2e_images"])
    items = [files[i % len(files)] for i in range(n)]

    def run(seq):
        outs = []
        with torch.inference_mode():
            for s in range(0, len(seq), ebs):
                x = torch.stack([tf(Image.open(p).convert("RGB")) for p in seq[s:s + ebs]])
                outs.append(net(x).float().numpy())
        return np.concatenate(outs)

    run(items[:ebs])  # warm-up
    t = time.perf_counter()
    logits = run(items)
    dt = time.perf_counter() - t
    res["e2e"] = {"images": n, "seconds": dt, "ips": n / dt, "batch_size": ebs,
                  "pipeline": "PIL open -> Grayscale(%d) -> Resize -> ToTensor -> Normalize; torch eager fp32, "
                              "inference_mode, one process" % pkg.preprocess.channels}
    np.save(out_dir / "e2e_probs.npy", softmax(logits[:len(files)]))
    res["peak_rss_sampled_mb"] = sampler.stop() / 2**20
    res["rss_start_mb"] = sampler.start / 2**20
    log(f"  reference pipeline: {res['e2e']['ips']:.1f} img/s")
    return res


# -- soak -------------------------------------------------------------------------------------------
def measure_soak(job: dict, log=lambda m: None) -> dict:
    """Stream N images (cycling the files) through Classifier.stream; RSS every `every` images."""
    import cxr_edge
    pkg = _package(job)
    clf = cxr_edge.load(pkg, backend=job.get("backend", "auto"), precision=job.get("precision", "auto"),
                        batch_size=int(job["e2e_batch_size"]), threads=job.get("threads"))
    files, n, every = job["files"], int(job["soak"]), int(job["soak_every"])
    items = (files[i % len(files)] for i in range(n))
    points = [(0, _rss() / 2**20)]
    errors, t = 0, time.perf_counter()
    for i, r in enumerate(clf.stream(items), 1):
        errors += 0 if r.ok else 1
        if i % every == 0 or i == n:
            points.append((i, _rss() / 2**20))
    dt = time.perf_counter() - t
    xs = np.array([p[0] for p in points], float)
    ys = np.array([p[1] for p in points], float)
    tail = xs >= 0.2 * n  # skip warm-up (allocators, thread pools, caches fill in the first batches)
    slope = float(np.polyfit(xs[tail], ys[tail], 1)[0] * 1000) if tail.sum() >= 2 else None
    clf.close()
    return {"backend": clf.backend.name, "precision": clf.precision, "images": n, "every": every,
            "seconds": dt, "ips": n / dt, "errors": errors, "rss_mb": points,
            "slope_mb_per_1000": slope, "slope_fit": "least squares over images >= 20% of the run",
            "rss_growth_mb": float(ys[-1] - ys[tail][0]) if tail.any() else None}


MODES = {"combination": measure_combination, "reference": measure_reference, "soak": measure_soak}


def run_job(job: dict, log=lambda m: None) -> dict:
    """In-process: never raises; a failure becomes {'status': 'error', 'error': ...}."""
    partial: dict = {}
    try:
        if job["mode"] == "combination":
            res = measure_combination(job, log, partial)
        else:
            res = MODES[job["mode"]](job, log)
        res["status"] = "ok"
    except Exception as e:  # what was measured before the failure is kept; 'stage' says where it broke
        res = dict(partial)
        where = f" (while measuring {res['stage']})" if res.get("stage") else ""
        res.update({"status": "error", "error": f"{type(e).__name__}: {e}".strip() + where,
                    "traceback": traceback.format_exc(limit=6)})
    return res


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    res = run_job(job, log=lambda m: print(m, file=sys.stderr, flush=True))
    res["peak_rss_mb"] = ru_maxrss() / 2**20
    res["rss_mode"] = "subprocess: ru_maxrss of a process that ran this job only"
    tmp = Path(job["out_dir"]) / "result.json.tmp"
    tmp.write_text(json.dumps(res, default=float))
    os.replace(tmp, Path(job["out_dir"]) / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
