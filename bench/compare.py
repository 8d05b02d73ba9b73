"""`cxr-edge bench --compare BASELINE.json`: a run against a stored report, for CI.

Works on both report kinds (the standard per-backend report and `--workload full-size`). Each
report is flattened into throughput metrics (higher is better), each with a relative spread
measured in that run:

- standard report, per combination: end-to-end img/s (spread: none measured, 0) and
  inference-only img/s per batch size (spread: (p90 - p50) / p50 of the per-call latencies);
- full-size report, per input kind: `classify` img/s and 1000 / `predict_one` p50 (spread:
  (max - min) / median over the repetitions).

A metric fails when  current < baseline x (1 - allowed),  allowed = tolerance + spread_baseline +
spread_current (the measured run-to-run noise widens the stated tolerance; it never narrows it).
A combination also fails when it ran in the baseline and errors now, when its bench parity gate
fails (standard report), or when its labels differ from the baseline's on the same inputs
(full-size report; the workload is built deterministically). Metrics only one side has are listed
but never fail.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TOLERANCE = 0.10


@dataclass
class Metric:
    value: float
    spread: float = 0.0         # relative, >= 0


def _rel_spread_latency(rec: dict) -> float:
    p50, p90 = rec.get("p50_ms"), rec.get("p90_ms")
    return max(0.0, (p90 - p50) / p50) if p50 and p90 else 0.0


def _rel_spread_stats(st: dict | None) -> float:
    if not st or not st.get("median"):
        return 0.0
    return max(0.0, (st["max"] - st["min"]) / st["median"])


def flatten(report: dict) -> tuple[dict[str, Metric], dict[str, str]]:
    """(metrics, problems): metric name -> Metric; combination -> why it is broken in this report."""
    metrics, problems = {}, {}
    if report.get("report_kind") == "full-size":
        summ = report.get("summary", {})
        for kind in report.get("workload", {}).get("kinds", {}):
            ks = summ.get(kind) or {}
            c = ks.get("classify_ips")
            if c:
                metrics[f"full-size {kind}: classify img/s"] = Metric(c["median"], _rel_spread_stats(c))
            p = ks.get("predict_one_p50_ms")
            if p and p["median"] > 0:
                metrics[f"full-size {kind}: predict_one /s"] = Metric(1e3 / p["median"], _rel_spread_stats(p))
            if ks.get("errors"):
                problems[f"full-size {kind}"] = f"{ks['errors']} images failed"
        for i, rep in enumerate(report.get("repetitions", [])):
            for mode, r in rep.items():
                if r.get("status") != "ok":
                    problems[f"full-size {mode}"] = f"repetition {i + 1}: {r.get('error')}"
        return metrics, problems
    for rec in report.get("records", []):
        key = rec.get("key") or f"{rec['backend']}/{rec['precision']}"
        if rec.get("status") == "unavailable":
            continue
        if rec.get("status") != "ok":
            problems[key] = f"error: {rec.get('reason') or rec.get('results', {}).get('error', '')}"[:200]
            continue
        r = rec.get("results", {})
        e = r.get("e2e") or {}
        if e.get("ips"):
            metrics[f"{key}: e2e img/s"] = Metric(e["ips"], 0.0)
        for bs, inf in (r.get("infer") or {}).items():
            if inf.get("ips"):
                metrics[f"{key}: infer b{bs} img/s"] = Metric(inf["ips"], _rel_spread_latency(inf))
        g = r.get("gate_bench")
        if g is not None and not g.get("passed"):
            problems[key] = "parity FAIL: " + "; ".join(g.get("failures", []))
    return metrics, problems


def _labels(report: dict) -> dict[str, list]:
    if report.get("report_kind") != "full-size":
        return {}
    return {k: (report.get("summary", {}).get(k) or {}).get("labels") for k in report.get("workload", {}).get("kinds", {})}


def compare(baseline: dict, current: dict, tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, str, list[dict]]:
    """(passed, markdown, rows). Raises ValueError when the two reports are of different kinds."""
    kb, kc = baseline.get("report_kind", "standard"), current.get("report_kind", "standard")
    if kb != kc:
        raise ValueError(f"cannot compare a {kc} report with a {kb} baseline")
    mb, pb = flatten(baseline)
    mc, pc = flatten(current)
    rows, failed = [], False
    for name in sorted(set(mb) | set(mc)):
        b, c = mb.get(name), mc.get(name)
        row = {"metric": name, "baseline": b.value if b else None, "current": c.value if c else None,
               "change": None, "allowed": None, "status": "new" if b is None else ("missing" if c is None else "ok")}
        if b and c:
            allowed = tolerance + b.spread + c.spread
            change = c.value / b.value - 1.0
            row.update(change=change, allowed=allowed)
            if change < -allowed:
                row["status"] = "SLOWER"
                failed = True
            elif change > allowed:
                row["status"] = "faster"
        rows.append(row)
    problems = []
    for key, why in sorted(pc.items()):
        if key not in pb:      # broken now, fine in the baseline: a regression
            problems.append((key, why))
            failed = True
    lb, lc = _labels(baseline), _labels(current)
    for kind in sorted(set(lb) & set(lc)):
        if lb[kind] and lc[kind] and lb[kind] != lc[kind]:
            problems.append((f"full-size {kind}", f"labels changed: {','.join(lb[kind])} -> {','.join(lc[kind])}"))
            failed = True
    L = [f"## cxr-edge bench --compare: {'PASS' if not failed else 'FAIL'}", "",
         f"Throughput drop allowed: {100 * tolerance:.0f}% + the relative run-to-run spread measured in each report.", "",
         "| metric | baseline | current | change | allowed drop | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        f = (lambda v: "–" if v is None else f"{v:.1f}")
        ch = "–" if r["change"] is None else f"{100 * r['change']:+.1f}%"
        al = "–" if r["allowed"] is None else f"{100 * r['allowed']:.0f}%"
        st = f"**{r['status']}**" if r["status"] == "SLOWER" else r["status"]
        L.append(f"| {r['metric']} | {f(r['baseline'])} | {f(r['current'])} | {ch} | {al} | {st} |")
    if problems:
        L += ["", "| combination | problem |", "|---|---|"]
        L += [f"| {k} | **{w.replace('|', '/')}** |" for k, w in problems]
    L.append("")
    return not failed, "\n".join(L), rows


def compare_files(baseline_path, current: dict, tolerance: float = DEFAULT_TOLERANCE) -> tuple[bool, str]:
    p = Path(baseline_path)
    try:
        baseline = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: baseline report not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a JSON report ({e})") from None
    ok, md, _ = compare(baseline, current, tolerance)
    return ok, md
