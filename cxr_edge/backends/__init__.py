"""Backend registry and the load-time `auto` choice. A new backend is one new module imported here.

`candidates` lists what the package and this machine allow (cheap: opens nothing, reads the
verdict cache); `decide` measures what is not yet known here (verification on the reference set
for combinations whose export verdict does not carry over, and speed) and ranks by that evidence
(cxr_edge.verify); `load_best` opens the winner.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..formats import BACKEND_ORDER, PRECISION_ORDER, needs_device_verdict, source_artifact
from . import onnxruntime_backend, openvino_backend, tensorrt_backend, torch_backend  # noqa: F401 (register)
from .base import REGISTRY, Backend, BackendError

log = logging.getLogger("cxr_edge")


@dataclass
class Choice:
    """One usable (backend, precision) candidate for a package on this machine.

    Attributes:
        artifact: the package Artifact it runs; reason: why it is usable; device: "cpu" or "cuda".
        evidence: its verify.Evidence; cache_key: its verdict-cache key (verify.cache_key).
    """
    backend: str
    precision: str
    artifact: object      # package Artifact
    reason: str
    device: str = "cpu"
    evidence: object = None          # verify.Evidence
    cache_key: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """"<backend>/<precision>", e.g. "openvino/int8"."""
        return f"{self.backend}/{self.precision}"

    @property
    def needs_device(self) -> bool:
        """Must be verified on this device before use, and has no verdict from here yet."""
        return needs_device_verdict(self.backend, self.precision, self.device) and self.evidence.source != "this device"


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend name: (usable here, why or why not)} for every registered backend, in BACKEND_ORDER."""
    return {name: REGISTRY[name].available() for name in BACKEND_ORDER if name in REGISTRY}


def precision_support(backend: str, precision: str, options: dict | None = None) -> tuple[bool, str]:
    """(whether this machine runs `precision` on `backend`, why not): the one capability check
    (native bf16/fp16 on the CPU, a CUDA GPU for torch fp16/bf16) that runtime, export and bench use."""
    cls = REGISTRY.get(backend)
    if cls is None:
        return False, f"unknown backend {backend!r}"
    try:
        return cls.supports(precision, options)
    except Exception as e:  # a capability query failing means "not here", never a crash
        return False, f"cannot query {backend} capabilities: {e}"


def candidates(package, backend: str, precision: str, options: dict | None = None,
               include_failed: bool = False) -> tuple[list[Choice], list[str]]:
    """Every (backend, precision) the package + machine allow, in formats order, and why others were
    skipped. Opens no backend: evidence comes from model.json and the verdict cache.
    include_failed: keep combinations whose export gate failed (to be measured here: `cxr-edge verify`)."""
    from ..verify import known_evidence
    ignore_gate = bool((options or {}).get("ignore_gate"))   # benchmarks of failed combinations only
    status = backend_status()
    names = BACKEND_ORDER if backend == "auto" else (backend,)
    out, skipped = [], []
    for name in names:
        if name not in REGISTRY:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKEND_ORDER)}")
        ok, why = status[name]
        if not ok:
            skipped.append(f"{name}: {why}")
            continue
        precs = PRECISION_ORDER[name] if precision == "auto" else (precision,)
        for prec in precs:
            art, src = source_artifact(package, name, prec)
            if src is None:
                skipped.append(f"{name} {prec}: not a precision {name} runs")
                continue
            ok_p, why_p = precision_support(name, prec, options)
            if not ok_p:
                skipped.append(f"{name} {prec}: unavailable: {why_p}")
                continue
            if art is None:
                skipped.append(f"{name} {prec}: package has no {src} artifact")
                continue
            device = REGISTRY[name].target_device(prec, options)
            ev, key = known_evidence(package, art, name, prec, device)
            if ignore_gate:
                ev.note = "gate ignored (options ignore_gate): measured for a benchmark only"
            elif ev.source == "this device" and not ev.passed:
                skipped.append(f"{name} {prec}: failed verification on this device: " + "; ".join(ev.verdict.failures))
                continue
            elif not needs_device_verdict(name, prec, device) and not ev.passed and not include_failed:
                detail = "; ".join(ev.verdict.failures) if ev.verdict and ev.verdict.failures else ev.note
                skipped.append(f"{name} {prec}: {art.file} did not pass its parity gate" + (f" ({detail})" if detail else ""))
                continue
            reason = (f"{status[name][1]}; " + ("the torch fp32 reference" if ev.source == "reference" else
                      f"{art.file} passed its parity gate ({ev.where()})" if ev.passed else
                      f"{art.file} to be verified on this device"))
            out.append(Choice(name, prec, art, reason, device, ev, key))
    return out, skipped


def choose(package, backend: str = "auto", precision: str = "auto", options: dict | None = None) -> tuple[Choice, list[str]]:
    """The first candidate in formats order, without measuring anything."""
    found, skipped = candidates(package, backend, precision, options)
    if not found:
        raise BackendError(f"no usable backend for {package.root} (backend={backend}, precision={precision}): "
                           + "; ".join(skipped))
    return found[0], skipped


def open_backend(package, choice: Choice, threads=None, options=None) -> Backend:
    """Open the chosen backend on its artifact (loads the model).

    Raises:
        BackendError: the backend could not load the model.
    """
    return REGISTRY[choice.backend](package, choice.artifact, choice.precision, threads, options)


@dataclass
class Decision:
    """What `auto` (or an explicit request) settled on, with the evidence for every candidate."""
    ranked: list                  # usable Choices, best first
    reason: str                   # why ranked[0]
    skipped: list                 # "backend precision: why" for everything not usable
    opened: dict                  # key -> open Backend (measured during the decision)

    @property
    def evidence(self) -> list:
        """The evidence of every ranked candidate, best first."""
        return [c.evidence for c in self.ranked]

    def close(self, keep: Backend | None = None):
        """Close every backend opened while deciding, except `keep` (the one the caller uses)."""
        for b in self.opened.values():
            if b is not keep:
                b.close()
        self.opened = {k: b for k, b in self.opened.items() if b is keep}


def status_text(c: Choice) -> str:
    """The backend's availability message (the `why` of `available()`) for a choice."""
    return REGISTRY[c.backend].available()[1]


def _measuring_enabled(options: dict | None) -> bool:
    opt = (options or {}).get("verify")
    if opt is not None:
        return bool(opt)
    return os.environ.get("CXR_EDGE_VERIFY", "1").lower() not in ("0", "false", "no", "off")


def decide(package, backend="auto", precision="auto", threads=None, options=None, measure: bool | None = None,
           force_parity: bool = False) -> Decision:
    """Candidates -> evidence -> ranking. With `measure` (default: options["verify"], else
    $CXR_EDGE_VERIFY, else on), what is unknown here is measured first: combinations that need a
    verdict from this device are verified on the reference set (failures are skipped, with the
    reason), and, when more than one candidate remains, each is timed. `force_parity` verifies
    every combination on this device (`cxr-edge verify`). options keys read here: "verify" (bool),
    "unverified_ok" (open combinations needing a device verdict without one), "ignore_gate" (also
    those whose gate failed: benchmarks only). Backends opened for measuring stay open
    in Decision.opened (the caller closes them, or keeps the winner)."""
    from ..verify import ReferenceSetError, Ranking, measure as measure_on, rank, read_reference_set, timed_together
    measure = _measuring_enabled(options) if measure is None else measure
    found, skipped = candidates(package, backend, precision, options, include_failed=force_parity)
    # the torch CPU reference is the fallback, not a contender: timing it would import torch
    contenders = [c for c in found if not (c.evidence.source == "reference")] or found
    fallback = [c for c in found if c not in contenders]
    unverified_ok = bool((options or {}).get("unverified_ok") or (options or {}).get("ignore_gate"))
    opened, usable = {}, []
    refset, tensors, ref_error = None, None, None
    if measure:
        try:
            refset = read_reference_set(package)
            tensors = refset.tensors(package.preprocess) if refset is not None else None
        except ReferenceSetError as e:
            ref_error = str(e)
    time_them = measure and len(contenders) > 1
    for c in contenders:
        parity = force_parity or (c.needs_device and not unverified_ok)
        if not measure:
            if c.needs_device and not unverified_ok:
                skipped.append(f"{c.backend} {c.precision}: not verified on this device (run `cxr-edge verify`)")
                continue
            usable.append(c)
            continue
        if parity and (refset is None):
            why = ref_error or "the package has no reference set (re-export it with this cxr-edge)"
            if force_parity and not c.needs_device and c.evidence.passed:
                c.evidence.note = f"not verified on this device: {why}"
                parity = False
            elif force_parity and not c.needs_device:
                detail = "; ".join(c.evidence.verdict.failures) if c.evidence.verdict else c.evidence.note
                skipped.append(f"{c.backend} {c.precision}: {c.artifact.file} did not pass its parity gate "
                               f"({detail}); cannot verify on this device: {why}")
                continue
            else:
                skipped.append(f"{c.backend} {c.precision}: cannot verify on this device: {why}")
                continue
        if not parity:
            usable.append(c)
            continue
        try:
            b = open_backend(package, c, threads, options)
        except Exception as e:
            skipped.append(f"{c.backend} {c.precision}: failed to load: {e}")
            continue
        opened[c.key] = b
        try:
            measure_on(package, b, c.evidence, c.cache_key, parity, refset, tensors, timed=not time_them)
        except Exception as e:
            skipped.append(f"{c.backend} {c.precision}: failed to run on the reference set: {e}")
            b.close()
            opened.pop(c.key)
            continue
        if not c.evidence.passed:
            skipped.append(f"{c.backend} {c.precision}: failed verification on this device: "
                           + "; ".join(c.evidence.verdict.failures))
            b.close()
            opened.pop(c.key)
            continue
        c.reason = f"{status_text(c)}; {c.artifact.file} passed its parity gate ({c.evidence.where()})"
        usable.append(c)
    if time_them and len(usable) > 1 and not timed_together([c.evidence for c in usable]):
        _time_usable_together(package, usable, opened, skipped, threads, options, refset, tensors)
    if usable:
        ranking = rank(usable) if (backend == "auto" or precision == "auto") else Ranking(usable, "as requested")
    else:
        ranking = Ranking([], "")
    ranked = ranking.order + fallback
    reason = ranking.reason if ranking.order else ("only the torch fp32 reference is usable" if fallback else "")
    return Decision(ranked, reason, skipped, opened)


def _time_usable_together(package, usable: list, opened: dict, skipped: list, threads, options, refset,
                          tensors) -> None:
    """Open every usable contender not yet open and time them all in one interleaved session
    (verify.time_together), so that `rank` compares speeds measured under the same load. A
    contender that fails to load is dropped from `usable`, with the reason in `skipped`."""
    from ..verify import measure_speeds_together
    for c in list(usable):
        if c.key not in opened:
            try:
                opened[c.key] = open_backend(package, c, threads, options)
            except Exception as e:
                skipped.append(f"{c.backend} {c.precision}: failed to load: {e}")
                usable.remove(c)
    measure_speeds_together(package, [(opened[c.key], c.evidence, c.cache_key) for c in usable], refset, tensors)


def _verify_now(package, ch: Choice, b: Backend) -> str:
    """Verify an open backend on the reference set; '' when it passed, else why not."""
    from ..verify import measure, read_reference_set
    try:
        refset = read_reference_set(package)
        if refset is None:
            return "the package has no reference set"
        measure(package, b, ch.evidence, ch.cache_key, True, refset, refset.tensors(package.preprocess))
    except Exception as e:
        return str(e)
    return "" if ch.evidence.passed else "; ".join(ch.evidence.verdict.failures)


def load_best(package, backend="auto", precision="auto", threads=None, options=None) -> tuple[Backend, str]:
    """Open the best candidate (see `decide`); if it fails to load (driver, CPU feature), fall back
    to the next. Returns (backend, why): why = "chose B P: reason | evidence: ... | skipped: ..."."""
    d = decide(package, backend, precision, threads, options)
    errors = []
    for ch in d.ranked:
        b = d.opened.get(ch.key)
        if b is None:
            try:
                b = open_backend(package, ch, threads, options)
            except Exception as e:  # a backend failing at load must not stop the next from trying
                errors.append(f"{ch.backend} {ch.precision}: failed to load: {e}")
                continue
            if getattr(b, "fresh_build", False) and needs_device_verdict(ch.backend, ch.precision, ch.device) \
                    and not (options or {}).get("unverified_ok") and not (options or {}).get("ignore_gate"):
                # a TensorRT engine built just now (its cache was empty): verified before its first use
                why_not = _verify_now(package, ch, b)
                if why_not:
                    b.close()
                    errors.append(f"{ch.backend} {ch.precision}: new engine failed verification: {why_not}")
                    continue
        d.close(keep=b)
        why = f"chose {ch.backend} {ch.precision}: {ch.reason}"
        if len(d.ranked) > 1 or ch.evidence.speed is not None:
            why += f"; auto: {d.reason}" if (backend == "auto" or precision == "auto") else ""
        why += " | evidence: " + "; ".join(c.evidence.summary() for c in d.ranked)
        if d.skipped or errors:
            why += " | skipped: " + "; ".join(d.skipped + errors)
        b.evidence = [c.evidence for c in d.ranked]
        log.info(why)
        return b, why
    d.close()
    raise BackendError(f"no usable backend for {package.root} (backend={backend}, precision={precision}): "
                       + "; ".join(d.skipped + errors))
