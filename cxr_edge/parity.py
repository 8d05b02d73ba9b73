"""Parity comparator (Polygraphy-style): compare a candidate's probabilities with the torch fp32
reference on the same preprocessed tensors, with explicit per-precision tolerances
(formats.TOLERANCES).

Running is separate from comparing: callers hand in probability arrays; this module only measures
(`compare` -> ParityStats) and judges (`judge` -> Verdict). model.json keeps both as plain JSON
objects ("parity" and "gate" of each artifact, keyed "<backend>/<precision>"); `to_dict` writes the
same keys older packages have, and `from_dict` reads records written before these types existed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .formats import TOLERANCES, Tolerance, wilson_lower_bound


@dataclass
class ParityStats:
    """Candidate vs reference probabilities on n images.

    agreement: fraction of images whose top-1 class matches the reference; lower_bound: its Wilson
    95 % lower confidence bound; *_abs_dp: |Δp| over classes, max / mean over all entries, p99 over
    images of each image's largest |Δp|. Label-dependent fields are None on unlabelled sets.
    """
    n: int
    agreement: float
    disagreements: int
    lower_bound: float
    max_abs_dp: float
    mean_abs_dp: float
    p99_abs_dp: float
    accuracy: float | None = None
    ref_accuracy: float | None = None
    accuracy_delta: float | None = None
    recall_delta: dict | None = None          # class -> candidate recall - reference recall
    newly_called_normal: int | None = None    # diseased images the reference caught, now called normal
    labelled_n: int | None = None
    seconds: float | None = None

    # model.json / report key -> attribute, where they differ (kept for backward compatibility)
    _RENAMED = {"top1_agreement": "agreement"}

    def to_dict(self) -> dict:
        """JSON-ready; keys as model.json has always had them ("top1_agreement", ...); None omitted."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out["top1_agreement" if f.name == "agreement" else f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ParityStats":
        """Read a record of any cxr-edge version; a missing lower_bound is recomputed from n and agreement.
        Raises ValueError for a record without n, agreement and max |Δp|."""
        if not isinstance(d, dict):
            raise ValueError(f"parity record must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        kw = {cls._RENAMED.get(k, k): v for k, v in d.items() if cls._RENAMED.get(k, k) in names}
        try:
            n, agreement = int(kw["n"]), float(kw["agreement"])
            kw.setdefault("disagreements", round(n * (1 - agreement)))
            kw.setdefault("lower_bound", wilson_lower_bound(n - int(kw["disagreements"]), n))
            kw.setdefault("mean_abs_dp", kw["max_abs_dp"])
            kw.setdefault("p99_abs_dp", kw["max_abs_dp"])
            return cls(**kw)
        except (KeyError, TypeError) as e:
            raise ValueError(f"parity record lacks n / top1_agreement / max_abs_dp: {e}") from None


@dataclass
class Verdict:
    """A gate decision. source: where the evidence was measured ("export", "this device",
    "reference", or "not measured"); skipped: why nothing was measured (then passed is False)."""
    passed: bool
    failures: list = field(default_factory=list)
    tolerance: dict = field(default_factory=dict)
    source: str = "export"
    skipped: str | None = None

    def to_dict(self) -> dict:
        """The verdict as a model.json gate record: `skipped`, or failures + tolerance; `source` unless "export"."""
        d = {"passed": self.passed}
        if self.skipped is not None:
            d["skipped"] = self.skipped
        else:
            d["failures"] = list(self.failures)
            d["tolerance"] = dict(self.tolerance)
        if self.source != "export":
            d["source"] = self.source
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Verdict":
        """Read a gate record of any cxr-edge version. Only an explicit `"passed": true` passes."""
        if not isinstance(d, dict):
            return cls(False, ["gate record is not an object"])
        skipped = d.get("skipped")
        return cls(passed=d.get("passed") is True and skipped is None,
                   failures=list(d.get("failures") or []), tolerance=dict(d.get("tolerance") or {}),
                   source=str(d.get("source", "not measured" if skipped else "export")),
                   skipped=None if skipped is None else str(skipped))

    @classmethod
    def not_measured(cls, why: str) -> "Verdict":
        """A failing verdict for a combination with no measurement, saying why (`skipped`)."""
        return cls(False, [], {}, "not measured", why)


def compare(ref_probs: np.ndarray, probs: np.ndarray, labels: np.ndarray | None = None, classes: list = (),
            normal_class: str | None = None) -> ParityStats:
    """ref_probs, probs: (n, K) probabilities of the reference and the candidate on the same inputs;
    labels: (n,) class indices, or None. Raises ValueError when the shapes differ."""
    ref_probs, probs = np.asarray(ref_probs, np.float64), np.asarray(probs, np.float64)
    if ref_probs.shape != probs.shape:
        raise ValueError(f"shape mismatch: reference {ref_probs.shape} vs candidate {probs.shape}")
    n = int(len(probs))
    d = np.abs(ref_probs - probs)
    ref_top, top = ref_probs.argmax(1), probs.argmax(1)
    agree = int((ref_top == top).sum())
    st = ParityStats(n=n, agreement=agree / n if n else 1.0, disagreements=n - agree,
                     lower_bound=wilson_lower_bound(agree, n),
                     max_abs_dp=float(d.max()) if d.size else 0.0, mean_abs_dp=float(d.mean()) if d.size else 0.0,
                     p99_abs_dp=float(np.quantile(d.max(1), 0.99)) if d.size else 0.0)
    if labels is not None and len(labels):
        labels = np.asarray(labels, int)
        st.labelled_n = int(len(labels))
        st.accuracy = float((top == labels).mean())
        st.ref_accuracy = float((ref_top == labels).mean())
        st.accuracy_delta = st.accuracy - st.ref_accuracy
        st.recall_delta = {}
        for i, c in enumerate(classes):
            m = labels == i
            if m.any():
                st.recall_delta[c] = float((top[m] == i).mean() - (ref_top[m] == i).mean())
        if normal_class in classes:
            ni = list(classes).index(normal_class)
            sick = labels != ni
            # the worst error a screening model makes: disease that the reference caught, now called normal
            st.newly_called_normal = int(((top == ni) & (ref_top != ni) & sick).sum())
    return st


TOO_FEW = "too few images to decide"


def judge(stats: ParityStats, precision: str, classes: list = (), normal_class: str | None = None,
          tolerance: Tolerance | None = None, source: str = "export") -> Verdict:
    """Apply formats.TOLERANCES[precision] (or `tolerance`) to measured stats."""
    if isinstance(stats, dict):
        stats = ParityStats.from_dict(stats)
    tol = tolerance or TOLERANCES[precision]
    failures = []
    if stats.agreement < tol.min_agreement:
        failures.append(f"top-1 agreement {100 * stats.agreement:.2f}% < {100 * tol.min_agreement:.2f}%")
    if tol.min_lower_bound is not None and stats.lower_bound < tol.min_lower_bound \
            and wilson_lower_bound(stats.n, stats.n) < tol.min_lower_bound:
        # no verdict is possible on so few images: say that, not that the precision is bad
        failures.append(f"{TOO_FEW}: n={stats.n} gives at most a {100 * wilson_lower_bound(stats.n, stats.n):.1f}% "
                        f"lower bound even with no flips, < {100 * tol.min_lower_bound:.2f}% "
                        f"({stats.disagreements} flips seen)")
    elif tol.min_lower_bound is not None and stats.lower_bound < tol.min_lower_bound:
        failures.append(f"agreement lower bound {100 * stats.lower_bound:.2f}% (Wilson 95 %, n={stats.n}, "
                        f"{stats.disagreements} flips) < {100 * tol.min_lower_bound:.2f}%")
    if tol.max_abs_dp is not None and stats.max_abs_dp > tol.max_abs_dp:
        failures.append(f"max |dp| {stats.max_abs_dp:.2e} > {tol.max_abs_dp:.0e}")
    if tol.max_accuracy_drop is not None and stats.accuracy_delta is not None \
            and -stats.accuracy_delta > tol.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy drop {-100 * stats.accuracy_delta:.2f} pp > {100 * tol.max_accuracy_drop:.2f} pp")
    if tol.max_disease_recall_drop is not None:
        for c, delta in (stats.recall_delta or {}).items():
            if c != normal_class and -delta > tol.max_disease_recall_drop + 1e-12:
                failures.append(f"{c} recall drop {-100 * delta:.2f} pp > {100 * tol.max_disease_recall_drop:.2f} pp")
    return Verdict(passed=not failures, failures=failures,
                   tolerance={k: v for k, v in tol.__dict__.items() if v is not None}, source=source)


def format_table(rows: list) -> str:
    """rows: (name, ParityStats, Verdict) -> a fixed-width table for terminals and logs."""
    head = (f"{'artifact / backend / precision':42s} {'n':>5s} {'agree%':>7s} {'LB95%':>6s} {'max|dp|':>9s} "
            f"{'mean|dp|':>9s} {'p99|dp|':>9s} {'dAcc pp':>8s}  gate")
    lines = [head, "-" * len(head)]
    for name, p, g in rows:
        p = p if isinstance(p, ParityStats) else ParityStats.from_dict(p)
        g = g if isinstance(g, Verdict) else Verdict.from_dict(g)
        dacc = f"{100 * p.accuracy_delta:+.2f}" if p.accuracy_delta is not None else "-"
        lines.append(f"{name:42s} {p.n:5d} {100 * p.agreement:7.2f} {100 * p.lower_bound:6.1f} {p.max_abs_dp:9.2e} "
                     f"{p.mean_abs_dp:9.2e} {p.p99_abs_dp:9.2e} {dacc:>8s}  "
                     + ("PASS" if g.passed else "FAIL: " + "; ".join(g.failures)))
    return "\n".join(lines)
