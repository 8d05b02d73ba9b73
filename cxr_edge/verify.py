"""On-device evidence: verify backend x precision combinations where they run, time them, cache
the verdicts, and rank them for `auto`.

Evidence for one combination comes from one of:
  "reference"    the torch fp32 reference itself (on the CPU);
  "export"       the gate recorded in model.json, measured on the export machine on its parity split
                 (valid here only where formats.needs_device_verdict says it carries over: fp32 and
                 int8 on CPUs);
  "this device"  measured here on the package's reference set (see ReferenceSet), against the torch
                 fp32 probabilities stored with it, judged with the same formats.TOLERANCES.

What is timed: the median wall time of `infer` on one batch of 8 reference tensors (synthetic
tensors when the package has no reference set), 5 timed runs after 1 warm-up; speed = 8 / median,
in images per second (inference only: no decode, no preprocess). Contenders for `auto` are timed
TOGETHER (`time_together`): one batch on each in turn, round after round, so that a load spike on
this machine hits them all alike; every speed of such a run carries the same `session`. `auto`
compares only speeds of one session: when the cached speeds of its contenders come from different
sessions (timed alone, or at different times under different load), they are timed again together.

Cache: one JSON file per (package digest, backend, precision, runtime version, device
fingerprint) under cache_root()/verdicts/. A file that cannot be read or does not match its key
is ignored and the combination re-measured. Files are written atomically (temp file + rename).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .formats import AUTO_SPEED_MARGIN, TOLERANCES, needs_device_verdict
from .parity import ParityStats, Verdict, compare, judge

CACHE_SCHEMA = 1
TIMING_BATCH = 8
TIMING_RUNS = 5
TIMING_IN_FLIGHT = 2        # batches submitted at once when timing (Classifier.stream keeps one in flight)
REFERENCE_SET_KEY = "reference_set"


class ReferenceSetError(Exception):
    """The package's reference set is missing, malformed or does not match its checksum."""


# -- the cache directory -------------------------------------------------------------------------
def cache_root() -> Path:
    """$CXR_EDGE_CACHE, else $XDG_CACHE_HOME/cxr-edge, else ~/.cache/cxr-edge (created on write)."""
    if os.environ.get("CXR_EDGE_CACHE"):
        return Path(os.environ["CXR_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxr-edge"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- the reference set ---------------------------------------------------------------------------
@dataclass
class ReferenceSet:
    """K images of the package's parity split, resampled (0..1, size x size) and stored as uint16,
    with the torch fp32 probabilities (K, classes) measured on them at export."""
    images: np.ndarray          # (K, size, size) float32 in 0..1 (dequantised)
    probabilities: np.ndarray   # (K, classes) float64
    logits: np.ndarray | None
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.images)

    def tensors(self, spec) -> np.ndarray:
        """(K, C, size, size) float32 model inputs: preprocess.normalise of each image."""
        from .preprocess import normalise
        return np.stack([normalise(x, spec) for x in self.images])


def reference_record(package) -> dict | None:
    """model.json's "reference_set" object, or None when the package has none."""
    rec = getattr(package, "reference_set", None)
    if rec:
        return rec
    try:
        meta = json.loads((Path(package.root) / "model.json").read_text())
    except (OSError, ValueError):
        return None
    rec = meta.get(REFERENCE_SET_KEY) if isinstance(meta, dict) else None
    return rec or None


def read_reference_set(package) -> ReferenceSet | None:
    """The package's reference set, checked against model.json; None when it has none.
    Raises ReferenceSetError when it is listed but missing, truncated, altered or inconsistent."""
    rec = reference_record(package)
    if rec is None:
        return None
    where = f"{package.root}: reference set"
    try:
        path = Path(package.root) / rec["file"]
        shape = tuple(int(v) for v in rec["shape"])
        scale = float(rec.get("scale", 65535))
        probs = np.asarray(rec["probabilities"], np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ReferenceSetError(f"{where}: model.json record malformed ({e})") from None
    if Path(rec["file"]).name != rec["file"]:
        raise ReferenceSetError(f"{where}: file {rec['file']!r} must be a plain name inside the package")
    if len(shape) != 3 or shape[1] != package.preprocess.size or shape[2] != package.preprocess.size:
        raise ReferenceSetError(f"{where}: shape {list(shape)} is not (K, {package.preprocess.size}, "
                                f"{package.preprocess.size})")
    if probs.shape != (shape[0], len(package.classes)):
        raise ReferenceSetError(f"{where}: probabilities {probs.shape} do not match {shape[0]} images x "
                                f"{len(package.classes)} classes")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ReferenceSetError(f"{where}: {rec['file']} cannot be read ({e.strerror or e})") from None
    need = 2 * shape[0] * shape[1] * shape[2]
    if len(raw) != need or ("bytes" in rec and int(rec["bytes"]) != len(raw)):
        raise ReferenceSetError(f"{where}: {rec['file']} has {len(raw)} bytes, {need} expected: truncated or replaced")
    digest = hashlib.sha256(raw).hexdigest()
    if rec.get("sha256") and digest != rec["sha256"]:
        raise ReferenceSetError(f"{where}: {rec['file']} checksum mismatch (model.json {str(rec['sha256'])[:12]}…, "
                                f"file {digest[:12]}…)")
    images = (np.frombuffer(raw, dtype="<u2").reshape(shape).astype(np.float32) / np.float32(scale))
    logits = np.asarray(rec["logits"], np.float64) if rec.get("logits") is not None else None
    return ReferenceSet(images, probs, logits, str(rec.get("source", "")), digest)


# -- fingerprints ------------------------------------------------------------------------------
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_fp16", "amx_int8", "asimd", "asimdhp", "bf16", "i8mm", "sve")


@functools.lru_cache(maxsize=None)  # hardware and installed libraries do not change while running
def _cpu_fingerprint() -> str:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in ("model name", "hardware", "cpu part") and not model:
                    model = v.strip()
                elif k in ("flags", "features"):
                    flags |= set(v.split())
                    if model:
                        break
    except OSError:
        pass
    feats = ",".join(f for f in _CPU_FLAGS if f in flags)
    return f"cpu:{platform.machine()}:{model or platform.processor()}:{feats}"


@functools.lru_cache(maxsize=None)  # hardware and installed libraries do not change while running
def _gpu_fingerprint() -> str:
    parts = []
    try:
        for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))[:1]:
            for line in info.read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    parts.append(line.split(":", 1)[1].strip())
        drv = Path("/proc/driver/nvidia/version")
        if drv.is_file():
            parts.append(drv.read_text(errors="replace").splitlines()[0][:120])
    except OSError:
        pass
    if not parts:
        try:
            from cuda.bindings import runtime as cudart
            err, props = cudart.cudaGetDeviceProperties(0)
            if int(err) == 0:
                parts.append(f"{props.name.decode(errors='replace').strip(chr(0))} sm{props.major}.{props.minor}")
            err, drv = cudart.cudaDriverGetVersion()
            parts.append(f"driver {drv}")
        except Exception:
            pass
    if not parts:
        try:
            import torch
            if torch.cuda.is_available():
                cc = torch.cuda.get_device_capability(0)
                parts.append(f"{torch.cuda.get_device_name(0)} sm{cc[0]}.{cc[1]}")
        except Exception:
            pass
    return "cuda:" + ("|".join(parts) or "unknown")


def device_fingerprint(device: str) -> str:
    """A string that changes when the hardware (CPU model and ISA features, or GPU model and driver)
    does: verdicts measured on another device kind are never reused."""
    return _gpu_fingerprint() if device == "cuda" else _cpu_fingerprint()


@functools.lru_cache(maxsize=None)  # hardware and installed libraries do not change while running
def runtime_version(backend: str, device: str = "cpu") -> str:
    """Version of the library that computes (and, on CUDA, of its CUDA stack)."""
    import importlib.metadata as md

    def v(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "?"
    if backend == "openvino":
        return f"openvino {v('openvino')}"
    if backend == "onnxruntime":
        dist = "onnxruntime-gpu" if v("onnxruntime-gpu") != "?" else "onnxruntime"
        return f"{dist} {v(dist)} {device}"
    if backend == "tensorrt":
        trt = next((v(d) for d in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12") if v(d) != "?"), "?")
        return f"tensorrt {trt} cuda-python {v('cuda-python') if v('cuda-python') != '?' else v('cuda-bindings')}"
    if backend == "torch":
        return f"torch {v('torch')} {device}"
    return f"{backend} ?"


def package_digest(package, artifact) -> str:
    """What a verdict depends on in the package: the artifact's bytes (sha256), the reference set's,
    the preprocessing and the classes."""
    rec = reference_record(package) or {}
    blob = json.dumps({"artifact": artifact.sha256 or artifact.file, "reference": rec.get("sha256"),
                       "preprocess": package.preprocess.to_dict(), "classes": list(package.classes)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- evidence ----------------------------------------------------------------------------------
@dataclass
class Speed:
    """Median inference time of one batch (see the module docstring for what is timed)."""
    images_per_s: float
    median_ms: float
    batch: int = TIMING_BATCH
    runs: int = TIMING_RUNS
    inputs: str = "reference tensors"
    session: str = ""                 # shared by every combination timed together ("" = timed alone)

    def text(self) -> str:
        """One-line speed, e.g. "123.4 img/s (batch 8, median of 5)"."""
        return f"{self.images_per_s:.1f} img/s (batch {self.batch}, median of {self.runs})"


@dataclass
class Evidence:
    """What is known about one combination on this machine."""
    backend: str
    precision: str
    device: str = "cpu"
    source: str = "not measured"          # "reference" | "export" | "this device" | "not measured"
    stats: ParityStats | None = None
    verdict: Verdict | None = None
    speed: Speed | None = None
    note: str = ""                        # why not measured, or a load error
    cached: bool = False                  # read from the verdict cache

    @property
    def key(self) -> str:
        """"<backend>/<precision>", e.g. "openvino/int8"."""
        return f"{self.backend}/{self.precision}"

    @property
    def passed(self) -> bool:
        """True for the reference itself, or when the verdict passed."""
        return self.source == "reference" or bool(self.verdict and self.verdict.passed)

    @property
    def faithfulness(self) -> float:
        """max |Δp| against the reference (0 for the reference itself; inf when unknown)."""
        if self.source == "reference":
            return 0.0
        return self.stats.max_abs_dp if self.stats is not None else float("inf")

    def where(self) -> str:
        """Where the evidence comes from: "reference (torch fp32)", "<source> on <n> images", or "not measured"."""
        if self.source == "reference":
            return "reference (torch fp32)"
        n = f" on {self.stats.n} images" if self.stats is not None else ""
        return f"{self.source}{n}" if self.source != "not measured" else "not measured"

    def summary(self) -> str:
        """One line: combination, device, source, agreement and max |dp|, verdict, speed and note, as known."""
        parts = [f"{self.key} on {self.device}: {self.where()}"]
        if self.stats is not None:
            parts.append(f"agreement {100 * self.stats.agreement:.2f}% (95% LB {100 * self.stats.lower_bound:.1f}%), "
                         f"max |dp| {self.stats.max_abs_dp:.1e}")
        if self.verdict is not None and self.source != "reference":
            parts.append("passed" if self.verdict.passed else
                         "FAILED: " + "; ".join(self.verdict.failures or [self.verdict.skipped or "not measured"]))
        if self.speed is not None:
            parts.append(self.speed.text())
        if self.note:
            parts.append(self.note)
        return ", ".join(parts)

    def record(self) -> dict:
        """The `cxr-edge verify --json` record."""
        s = self.stats
        return {"backend": self.backend, "precision": self.precision, "device": self.device, "source": self.source,
                "n": s.n if s else None, "agreement": s.agreement if s else None,
                "lower_bound": s.lower_bound if s else None, "max_abs_dp": s.max_abs_dp if s else None,
                "p99_abs_dp": s.p99_abs_dp if s else None,
                "speed": self.speed.images_per_s if self.speed else None,
                "speed_detail": asdict(self.speed) if self.speed else None,
                "passed": self.passed, "failures": (self.verdict.failures if self.verdict else []),
                "note": self.note}


# -- cache ---------------------------------------------------------------------------------------
def cache_key(package, artifact, backend: str, precision: str, device: str) -> dict:
    """The verdict-cache key of one combination on this device, as a JSON-able dict.

    It changes when the package files, the runtime version or the device change (schema, package digest,
    backend, precision, runtime, device fingerprint), so a cached verdict is never reused across them.
    """
    return {"schema": CACHE_SCHEMA, "package": package_digest(package, artifact), "backend": backend,
            "precision": precision, "runtime": runtime_version(backend, device),
            "device": device_fingerprint(device)}


def _cache_path(key: dict) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "verdicts" / f"{key['backend']}-{key['precision']}-{h}.json"


def load_cached(key: dict) -> dict | None:
    """The cache entry for `key`, or None when absent, unreadable or not for this key."""
    try:
        entry = json.loads(_cache_path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    try:
        if entry.get("stats") is not None:
            entry["stats"] = ParityStats.from_dict(entry["stats"])
        if entry.get("speed") is not None:
            entry["speed"] = Speed(**entry["speed"])
    except (TypeError, ValueError):
        return None
    return entry


def store(key: dict, stats: ParityStats | None, speed: Speed | None) -> None:
    """Cache what was measured here (parity stats and/or speed). Never raises: a read-only home only
    costs a re-measurement next time."""
    entry = {"key": key, "stats": stats.to_dict() if stats else None, "speed": asdict(speed) if speed else None,
             "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        atomic_write(_cache_path(key), (json.dumps(entry, indent=1) + "\n").encode())
    except OSError:
        pass


# -- measuring ---------------------------------------------------------------------------------
def _softmax(logits):
    from .postprocess import softmax
    return softmax(logits)


def _timing_batch(tensors: np.ndarray) -> np.ndarray:
    batch = np.ascontiguousarray(tensors[:TIMING_BATCH])
    if len(batch) < TIMING_BATCH:
        batch = np.concatenate([batch] * (TIMING_BATCH // max(1, len(batch)) + 1))[:TIMING_BATCH]
    return batch


def time_backend(backend, tensors: np.ndarray, inputs: str) -> Speed:
    """Median of TIMING_RUNS timed `infer` calls on one batch (after one warm-up), alone."""
    return time_together([backend], tensors, inputs, session="")[0]


def time_together(backends: list, tensors: np.ndarray, inputs: str, session: str | None = None) -> list[Speed]:
    """Time several open backends on the same batch, interleaved: one warm-up each, then TIMING_RUNS
    rounds in which each backend runs TIMING_IN_FLIGHT copies of the batch, in turn. Returns one
    Speed per backend (median over its rounds of the time per batch), all carrying one new `session`
    id (or the given one).

    The copies are submitted together (`infer_async`) because that is how `Classifier.stream` runs
    a backend: a batch stays in flight while the next is prepared. An asynchronous backend
    (OpenVINO's throughput streams, one per core; TensorRT) then runs them at once, a synchronous one
    (ONNX Runtime, torch) in turn. Timing one synchronous call instead measured OpenVINO on one of
    its streams: about half its throughput here, so auto picked ONNX Runtime fp32 over OpenVINO int8."""
    batch = _timing_batch(tensors)
    for b in backends:
        [h.result() for h in [b.infer_async(batch) for _ in range(TIMING_IN_FLIGHT)]]
    times = [[] for _ in backends]
    for _ in range(TIMING_RUNS):
        for i, b in enumerate(backends):
            t = time.perf_counter()
            for h in [b.infer_async(batch) for _ in range(TIMING_IN_FLIGHT)]:
                h.result()
            times[i].append((time.perf_counter() - t) / TIMING_IN_FLIGHT)
    if session is None:
        session = f"{time.time_ns():x}-{os.getpid():x}"
    out = []
    for ts in times:
        med = float(np.median(ts))
        out.append(Speed(images_per_s=len(batch) / med, median_ms=1000 * med, inputs=inputs, session=session))
    return out


def timed_together(evidence: list) -> bool:
    """True when every evidence has a speed and all were timed in one session (comparable)."""
    sessions = {e.speed.session if e.speed is not None else None for e in evidence}
    return len(sessions) == 1 and next(iter(sessions)) not in (None, "")


def measure_parity(backend, tensors: np.ndarray, ref_probs: np.ndarray, batch: int = 16) -> ParityStats:
    """Run every reference tensor (batches of `batch`, several in flight where the backend is
    asynchronous) and compare with the stored torch fp32 probabilities."""
    handles = [backend.infer_async(tensors[i:i + batch]) for i in range(0, len(tensors), batch)]
    logits = np.concatenate([h.result()["logits"] for h in handles])
    return compare(ref_probs, _softmax(logits))


def synthetic_tensors(spec, n: int = TIMING_BATCH) -> np.ndarray:
    """Deterministic stand-ins for timing when a package has no reference set (speed of these
    networks does not depend on pixel values)."""
    return np.random.default_rng(0).standard_normal((n, spec.channels, spec.size, spec.size)).astype(np.float32)


# -- what is known without measuring -----------------------------------------------------------
def known_evidence(package, artifact, backend: str, precision: str, device: str) -> tuple[Evidence, dict]:
    """Evidence from model.json and the cache only (opens nothing). Returns (evidence, cache key)."""
    key = cache_key(package, artifact, backend, precision, device)
    ev = Evidence(backend, precision, device)
    entry = load_cached(key)
    if backend == "torch" and precision == "fp32" and device == "cpu":
        ev.source, ev.verdict = "reference", Verdict(True, [], {}, "reference")
    elif entry and entry.get("stats") is not None:
        ev.source, ev.stats, ev.cached = "this device", entry["stats"], True
        ev.verdict = judge(ev.stats, precision, package.classes, package.normal_class, source="this device")
    elif not needs_device_verdict(backend, precision, device):
        key_s = f"{backend}/{precision}"
        gate = artifact.gate.get(key_s)
        if gate is not None:
            ev.verdict = Verdict.from_dict(gate)
            if ev.verdict.skipped is None:
                ev.source = "export"
                try:
                    ev.stats = ParityStats.from_dict(artifact.parity[key_s])
                except (KeyError, ValueError):
                    pass
                if ev.verdict.passed and ev.stats is not None:
                    # a gate recorded under older, looser tolerances must also pass today's
                    now = judge(ev.stats, precision, package.classes, package.normal_class)
                    if not now.passed:
                        ev.verdict = Verdict(False, [f"recorded gate passed, but today's tolerances fail it: {f}"
                                                     for f in now.failures], now.tolerance)
            else:
                ev.note = f"not measured at export ({ev.verdict.skipped})"
        else:
            ev.note = "no gate recorded in model.json"
    else:
        ev.note = "not yet verified on this device"
    if entry and entry.get("speed") is not None:
        ev.speed, ev.cached = entry["speed"], True
    return ev, key


def measure(package, backend, ev: Evidence, key: dict, parity: bool, refset: ReferenceSet | None,
            tensors: np.ndarray | None, timed: bool = True) -> Evidence:
    """Measure on an open backend: parity on the reference set when `parity`, and speed (alone)
    when `timed`. Updates `ev` and the cache. Raises ReferenceSetError when parity is asked for
    without a reference set."""
    stats = None
    if parity:
        if refset is None:
            raise ReferenceSetError(f"{package.root}: the package has no reference set "
                                    "(re-export it with this cxr-edge to verify on this device)")
        t = time.perf_counter()
        stats = measure_parity(backend, tensors, refset.probabilities)
        stats.seconds = round(time.perf_counter() - t, 3)
        ev.source, ev.stats, ev.cached, ev.note = "this device", stats, False, ""
        ev.verdict = judge(stats, ev.precision, package.classes, package.normal_class, source="this device")
    if timed:
        inputs = "reference tensors" if refset is not None else "synthetic tensors"
        ev.speed = time_backend(backend, tensors if refset is not None else synthetic_tensors(package.preprocess),
                                inputs)
    store(key, stats if stats is not None else (ev.stats if ev.source == "this device" else None), ev.speed)
    return ev


def measure_speeds_together(package, opened: list, refset: ReferenceSet | None, tensors: np.ndarray | None) -> None:
    """Time open backends together (`time_together`) and store each speed with its evidence.
    opened: (backend, evidence, cache key) triples."""
    inputs = "reference tensors" if refset is not None else "synthetic tensors"
    x = tensors if refset is not None else synthetic_tensors(package.preprocess)
    for (b, ev, key), sp in zip(opened, time_together([b for b, _, _ in opened], x, inputs)):
        ev.speed = sp
        store(key, ev.stats if ev.source == "this device" else None, sp)


# -- ranking -----------------------------------------------------------------------------------
@dataclass
class Ranking:
    """The order `rank` chose for `auto`: candidates best first, and why the first one was chosen."""
    order: list                       # candidates (objects with .evidence), best first
    reason: str                       # why the first one was chosen
    evidence: list = field(default_factory=list)


def rank(cands: list, margin: float = AUTO_SPEED_MARGIN) -> Ranking:
    """Order candidates (each with .evidence, in formats order) for `auto`: fastest verified first;
    among those within `margin` of the fastest, the most faithful (smallest max |Δp|). Candidates
    not timed here keep formats order behind the timed ones."""
    timed = [c for c in cands if c.evidence.speed is not None]
    untimed = [c for c in cands if c.evidence.speed is None]
    if not timed:
        return Ranking(list(cands), "first in the formats order (nothing timed on this device)")
    by_speed = sorted(timed, key=lambda c: -c.evidence.speed.images_per_s)
    fastest = by_speed[0].evidence.speed.images_per_s
    close = [c for c in by_speed if c.evidence.speed.images_per_s >= (1 - margin) * fastest]
    best = min(close, key=lambda c: (c.evidence.faithfulness, -c.evidence.speed.images_per_s))
    order = [best] + [c for c in by_speed if c is not best] + untimed
    e = best.evidence
    if best is by_speed[0]:
        reason = f"fastest verified here ({e.speed.images_per_s:.1f} img/s"
        if len(by_speed) > 1:
            nxt = by_speed[1].evidence
            reason += f"; next {nxt.key} {nxt.speed.images_per_s:.1f} img/s"
        reason += ")"
    else:
        f = by_speed[0].evidence
        reason = (f"within {100 * margin:.0f} % of the fastest ({f.key} {f.speed.images_per_s:.1f} img/s vs "
                  f"{e.speed.images_per_s:.1f}) and more faithful (max |dp| {e.faithfulness:.1e} vs {f.faithfulness:.1e})")
    return Ranking(order, reason)


def tolerance_text(precision: str) -> str:
    """The nonzero parity tolerances of a precision (formats.TOLERANCES) as "name value, ..."."""
    t = TOLERANCES[precision]
    return ", ".join(f"{k} {v}" for k, v in t.__dict__.items() if v)


# -- reporting and `cxr-edge verify` -----------------------------------------------------------
def format_evidence(evidence: list) -> str:
    """Evidence rows -> a fixed-width table (where verified, n, agreement, lower bound, |Δp|, speed)."""
    head = (f"{'combination':18s} {'device':6s} {'verified':26s} {'n':>5s} {'agree%':>7s} {'LB95%':>6s} "
            f"{'max|dp|':>8s} {'p99|dp|':>8s} {'img/s':>7s}  result")
    lines = [head, "-" * len(head)]
    for e in evidence:
        s = e.stats
        src = e.where() if e.source != "reference" else "reference"
        cells = (f"{e.key:18s} {e.device:6s} {src[:26]:26s} "
                 + (f"{s.n:5d} {100 * s.agreement:7.2f} {100 * s.lower_bound:6.1f} {s.max_abs_dp:8.1e} {s.p99_abs_dp:8.1e}"
                    if s else f"{'-':>5s} {'-':>7s} {'-':>6s} {'-':>8s} {'-':>8s}")
                 + (f" {e.speed.images_per_s:7.1f}" if e.speed else f" {'-':>7s}"))
        if e.source == "reference":
            res = "reference"
        elif e.verdict is None:
            res = e.note or "not measured"
        else:
            res = "PASS" if e.verdict.passed else "FAIL: " + "; ".join(e.verdict.failures or [e.verdict.skipped or ""])
        if e.note and e.verdict is not None:
            res += f" ({e.note})"
        lines.append(f"{cells}  {res}")
    return "\n".join(lines)


def verify_combinations(package, backends=None, precisions=None, threads=None, options=None) -> list[Evidence]:
    """Verify every combination of formats.RUNS (filtered by `backends` / `precisions`) on this device:
    parity on the reference set and speed, cached. Unavailable combinations come back with
    source "unavailable" and the reason in `note`; ones that fail to load or run with source
    "error". Never raises for a single combination."""
    from .backends import BackendError, decide
    from .formats import RUNS
    out = []
    for r in RUNS:
        if (backends and r.backend not in backends) or (precisions and r.precision not in precisions):
            continue
        try:
            d = decide(package, r.backend, r.precision, threads, options, measure=True, force_parity=True)
        except BackendError as e:
            out.append(Evidence(r.backend, r.precision, "-", "unavailable", note=str(e)))
            continue
        d.close()
        if d.ranked:
            out.append(d.ranked[0].evidence)
            continue
        why = "; ".join(x.split(": ", 1)[1] if ": " in x else x for x in d.skipped) or "not usable"
        src = ("error" if "failed to" in why else
               "failed" if ("failed verification" in why or "did not pass" in why) else "unavailable")
        ev = Evidence(r.backend, r.precision, "-", src, note=why)
        if src == "failed":          # the verdict was measured here and is cached: show its numbers
            from .formats import source_artifact
            art, _ = source_artifact(package, r.backend, r.precision)
            from .backends import REGISTRY
            dev = REGISTRY[r.backend].target_device(r.precision, options)
            known, _ = known_evidence(package, art, r.backend, r.precision, dev)
            if known.source == "this device":
                ev = known
        out.append(ev)
    return out


def add_parser(sub) -> None:
    """Add the `cxr-edge verify` subcommand (options and exit statuses) to an argparse subparsers object."""
    p = sub.add_parser(
        "verify", help="verify every backend/precision on this device against the package's reference set",
        description="Run each backend x precision available here on the package's reference set, compare with "
                    "the torch fp32 probabilities stored with it (formats.TOLERANCES: agreement lower bound, max "
                    "|dp|), time it (median batch-8 inference), and cache the verdict for `auto`. "
                    "Cache: $CXR_EDGE_CACHE, else $XDG_CACHE_HOME/cxr-edge, else ~/.cache/cxr-edge.",
        epilog="exit status: 0 every measured combination passed; 1 one failed (or a combination named with both "
               "--backend and --precision could not be verified); 2 usage or model errors")
    p.add_argument("--model", metavar="PKG", help="model package directory (default: the embedded default model)")
    p.add_argument("--backend", choices=["tensorrt", "openvino", "onnxruntime", "torch"], help="only this backend")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], help="only this run precision")
    p.add_argument("--device", choices=["cpu", "cuda"], help="for torch fp32 and onnxruntime: where to run "
                   "(default: torch fp32 on the CPU, onnxruntime on CUDA when its provider is there)")
    p.add_argument("--threads", type=int, help="inference threads (default: the backend's choice)")
    p.add_argument("--json", action="store_true", help="one JSON record per combination")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    """`cxr-edge verify`: see add_parser."""
    from .package import ModelPackage
    pkg = ModelPackage.read(args.model)
    options = {"device": args.device} if args.device else None
    evidence = verify_combinations(pkg, [args.backend] if args.backend else None,
                                   [args.precision] if args.precision else None, args.threads, options)
    explicit = bool(args.backend and args.precision)
    failed = [e for e in evidence if e.source in ("failed", "error") or (e.verdict is not None and not e.passed)
              or (explicit and not e.passed)]
    if args.json:
        import sys
        for e in evidence:
            sys.stdout.write(json.dumps(e.record()) + "\n")
    else:
        print(f"model {pkg.name} ({pkg.root}); reference set: "
              + (f"{len(reference_record(pkg)['probabilities'])} images" if reference_record(pkg) else "none"))
        print(format_evidence(evidence))
        print(f"{len(evidence) - len(failed)} ok, {len(failed)} failed; verdicts cached in {cache_root() / 'verdicts'}")
    return 1 if failed else 0
