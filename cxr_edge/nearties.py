"""Near-ties said out loud: each result's top-2 margin and whether its label may differ from the
torch fp32 reference model's.

Rule (documented in README and the model card):
    margin    = p(top-1) - p(top-2) of the result, in probability units (0..1).
    uncertain = margin < 2 * d, where d is the p99 of the per-image max |Δp| measured for the running
                (backend, precision) against torch fp32 on the package's parity split (model.json,
                artifact parity "<backend>/<precision>" -> "p99_abs_dp"), and never below EPS.
Why 2·d: when every class probability moves by at most d, the gap between two classes moves by at
most 2·d, so a result whose margin is at least 2·d has the reference model's label for every image
whose |Δp| is within the p99; below it, the reference might have named the runner-up. Measured on
the default package (INT8, 899 unseen X-rays): 1 x p99 flags 3.4 % and misses 1 of 6 label flips,
2 x p99 flags 7.8 % and misses none. Export records, per combination, how many parity images the
rule flags ("uncertain") and how many label flips it missed ("flips_not_uncertain").
fp32 runs have d ~ 1e-7, so only exact coin flips (margin < EPS) are uncertain there.
When the running combination was not measured (e.g. a TensorRT engine built on another machine),
the largest p99 recorded for any backend at that precision is used; with no record at all, the
threshold is unknown and `uncertain` is None.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-4     # below this margin a label is a coin flip at any precision
FACTOR = 2.0   # threshold = FACTOR x p99 |Δp| (see the rule above)


def margins(probs: np.ndarray) -> np.ndarray:
    """(N, K) probabilities -> (N,) float64 top-1 minus top-2 probability (1.0 when K == 1)."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (N, K), got shape {p.shape}")
    if p.shape[1] < 2:
        return np.ones(len(p))
    s = np.partition(p, -2, axis=1)
    return s[:, -1] - s[:, -2]


def threshold(artifact, backend: str, precision: str) -> float | None:
    """The margin below which a result of this (artifact, backend, precision) is uncertain, or None
    when no measured |Δp| exists for it. artifact: a package Artifact (its .parity dict is read)."""
    if backend == "torch" and precision == "fp32":
        return EPS                                   # the reference itself
    parity = getattr(artifact, "parity", None) or {}
    rec = parity.get(f"{backend}/{precision}")
    d = rec.get("p99_abs_dp") if isinstance(rec, dict) else None
    if d is None:
        ds = [r.get("p99_abs_dp") for k, r in parity.items()
              if isinstance(r, dict) and k.endswith("/" + precision) and r.get("p99_abs_dp") is not None]
        d = max(ds) if ds else None
    if d is None:
        return None
    return max(FACTOR * float(d), EPS)


def flag(probs: np.ndarray, thr: float | None) -> tuple[np.ndarray, list]:
    """(margins (N,), uncertain list of bool|None) for (N, K) probabilities and a threshold."""
    m = margins(probs)
    return m, [None if thr is None else bool(v < thr) for v in m]


def sources_and_near_ties(ref: np.ndarray, probs: np.ndarray, sources: list, backend: str, precision: str) -> dict:
    """Extra parity fields for one measured combination: per-source agreement ("by_source":
    {source: {n, agreement, disagreements}}, when sources are known) and the near-tie rule of
    cxr_edge.nearties applied to the candidate's own outputs: "near_tie_threshold" (FACTOR x p99 |Δp|,
    >= nearties.EPS), "uncertain" (images below it) and "flips_not_uncertain" (label flips the rule
    missed; 0 is the goal)."""
    agree = ref.argmax(1) == probs.argmax(1)
    out = {}
    if sources and any(sources):
        src = np.asarray(sources)
        out["by_source"] = {u: {"n": int((src == u).sum()), "agreement": float(agree[src == u].mean()),
                                "disagreements": int((~agree[src == u]).sum())} for u in sorted(set(sources))}
    d = np.abs(np.asarray(ref, np.float64) - probs).max(1)
    thr = EPS if backend == "torch" else max(FACTOR * float(np.quantile(d, 0.99)), EPS)
    m = margins(probs)
    out.update(near_tie_threshold=thr, uncertain=int((m < thr).sum()),
               flips_not_uncertain=int((~agree & (m >= thr)).sum()))
    return out
