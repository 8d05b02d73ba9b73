"""Parity comparator (Polygraphy-style): compare a candidate's probabilities with the torch fp32
reference on the same preprocessed tensors, with explicit per-precision tolerances.

Running is separate from comparing: callers hand in probability arrays; this module only
measures and judges. export/ records the result in model.json, bench/ recomputes it."""
from __future__ import annotations

import numpy as np

from .formats import TOLERANCES, Tolerance


def compare(ref_probs: np.ndarray, probs: np.ndarray, labels: np.ndarray | None, classes: list,
            normal_class: str | None = None) -> dict:
    ref_probs, probs = np.asarray(ref_probs, np.float64), np.asarray(probs, np.float64)
    if ref_probs.shape != probs.shape:
        raise ValueError(f"shape mismatch: reference {ref_probs.shape} vs candidate {probs.shape}")
    d = np.abs(ref_probs - probs)
    ref_top, top = ref_probs.argmax(1), probs.argmax(1)
    out = {
        "n": int(len(probs)),
        "top1_agreement": float((ref_top == top).mean()) if len(probs) else 1.0,
        "disagreements": int((ref_top != top).sum()),
        "max_abs_dp": float(d.max()) if d.size else 0.0,
        "mean_abs_dp": float(d.mean()) if d.size else 0.0,
        "p99_abs_dp": float(np.quantile(d.max(1), 0.99)) if d.size else 0.0,
    }
    if labels is not None and len(labels):
        labels = np.asarray(labels, int)
        out["accuracy"] = float((top == labels).mean())
        out["ref_accuracy"] = float((ref_top == labels).mean())
        out["accuracy_delta"] = out["accuracy"] - out["ref_accuracy"]
        rec = {}
        for i, c in enumerate(classes):
            m = labels == i
            if m.any():
                rec[c] = float((top[m] == i).mean() - (ref_top[m] == i).mean())
        out["recall_delta"] = rec
        if normal_class in classes:
            ni = classes.index(normal_class)
            sick = labels != ni
            # the worst error a screening model makes: disease that the reference caught, now called normal
            out["newly_called_normal"] = int(((top == ni) & (ref_top != ni) & sick).sum())
    return out


def judge(parity: dict, precision: str, classes: list, normal_class: str | None = None,
          tolerance: Tolerance | None = None) -> dict:
    tol = tolerance or TOLERANCES[precision]
    failures = []
    if parity["top1_agreement"] < tol.min_agreement:
        failures.append(f"top-1 agreement {100 * parity['top1_agreement']:.2f}% < {100 * tol.min_agreement:.2f}%")
    if tol.max_abs_dp is not None and parity["max_abs_dp"] > tol.max_abs_dp:
        failures.append(f"max |dp| {parity['max_abs_dp']:.2e} > {tol.max_abs_dp:.0e}")
    if tol.max_accuracy_drop is not None and "accuracy_delta" in parity and -parity["accuracy_delta"] > tol.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy drop {-100 * parity['accuracy_delta']:.2f} pp > {100 * tol.max_accuracy_drop:.2f} pp")
    if tol.max_disease_recall_drop is not None:
        for c, delta in parity.get("recall_delta", {}).items():
            if c != normal_class and -delta > tol.max_disease_recall_drop + 1e-12:
                failures.append(f"{c} recall drop {-100 * delta:.2f} pp > {100 * tol.max_disease_recall_drop:.2f} pp")
    return {"passed": not failures, "failures": failures,
            "tolerance": {k: v for k, v in tol.__dict__.items() if v is not None}}


def format_table(rows: list[tuple[str, dict, dict]]) -> str:
    """rows: (name, parity, gate) -> a fixed-width table for terminals and logs."""
    head = f"{'artifact / backend / precision':42s} {'n':>5s} {'agree%':>7s} {'max|dp|':>9s} {'mean|dp|':>9s} {'p99|dp|':>9s} {'dAcc pp':>8s}  gate"
    lines = [head, "-" * len(head)]
    for name, p, g in rows:
        dacc = f"{100 * p['accuracy_delta']:+.2f}" if "accuracy_delta" in p else "-"
        lines.append(f"{name:42s} {p['n']:5d} {100 * p['top1_agreement']:7.2f} {p['max_abs_dp']:9.2e} "
                     f"{p['mean_abs_dp']:9.2e} {p['p99_abs_dp']:9.2e} {dacc:>8s}  "
                     + ("PASS" if g["passed"] else "FAIL: " + "; ".join(g["failures"])))
    return "\n".join(lines)
