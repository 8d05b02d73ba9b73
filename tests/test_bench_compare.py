"""`cxr-edge bench --compare` on synthetic reports (no timing here), the full-size workload's
files and its summary (medians over repetitions)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_edge.bench.compare import compare
from cxr_edge.bench.station import markdown, summarise


def standard_report(e2e=100.0, infer8=400.0, p50=10.0, p90=11.0, gate_passed=True, status="ok"):
    rec = {"backend": "openvino", "precision": "int8", "key": "openvino/int8", "status": status, "reason": "",
           "results": {"e2e": {"ips": e2e}, "infer": {"8": {"ips": infer8, "p50_ms": p50, "p90_ms": p90}},
                       "gate_bench": {"passed": gate_passed, "failures": [] if gate_passed else ["top-1 agreement 97%"]}}}
    ref = {"backend": "torch", "precision": "fp32", "key": "torch/fp32", "status": "ok", "reason": "",
           "results": {"e2e": {"ips": 20.0}, "infer": {"8": {"ips": 50.0, "p50_ms": 160.0, "p90_ms": 170.0}}}}
    return {"report_version": 1, "records": [rec, ref]}


def test_unchanged_run_passes_and_prints_a_table():
    ok, md, rows = compare(standard_report(), standard_report())
    assert ok
    assert md.startswith("## cxr-edge bench --compare: PASS")
    assert "| openvino/int8: e2e img/s | 100.0 | 100.0 | +0.0% |" in md
    assert {r["status"] for r in rows} == {"ok"}


def test_drop_beyond_tolerance_fails():
    ok, md, rows = compare(standard_report(e2e=100.0), standard_report(e2e=85.0), tolerance=0.10)
    assert not ok
    row = next(r for r in rows if r["metric"] == "openvino/int8: e2e img/s")
    assert row["status"] == "SLOWER" and row["change"] == pytest.approx(-0.15)
    assert "**SLOWER**" in md and "FAIL" in md.splitlines()[0]


def test_drop_within_the_measured_spread_passes():
    # infer b8 drops 15%, but p90/p50 says each run's calls spread by 10%: 10% + 10% + 10% allowed
    base = standard_report(infer8=400.0, p50=10.0, p90=11.0)
    cur = standard_report(infer8=340.0, p50=11.8, p90=12.98)
    ok, _, rows = compare(base, cur, tolerance=0.10)
    row = next(r for r in rows if r["metric"] == "openvino/int8: infer b8 img/s")
    assert row["allowed"] == pytest.approx(0.30) and row["status"] == "ok"
    assert ok


def test_faster_is_not_a_failure():
    ok, _, rows = compare(standard_report(e2e=100.0), standard_report(e2e=150.0))
    assert ok and next(r for r in rows if r["metric"].endswith("e2e img/s") and "openvino" in r["metric"])["status"] == "faster"


def test_parity_failure_and_new_errors_fail():
    ok, md, _ = compare(standard_report(), standard_report(gate_passed=False))
    assert not ok and "parity FAIL: top-1 agreement 97%" in md
    ok, md, _ = compare(standard_report(), standard_report(status="error"))
    assert not ok and "openvino/int8" in md
    # broken in both: not a regression of this change
    ok, _, _ = compare(standard_report(gate_passed=False), standard_report(gate_passed=False))
    assert ok


def fullsize_report(classify=(100.0, 95.0, 110.0), p1=(10.0, 9.0, 12.0), labels=("normal", "pneumonia")):
    ours = lambda i: {"status": "ok", "infer_b1_p50_ms": 5.0, "backend": "openvino int8",
                      "kinds": {"dicom": {"decode_p50_ms": 4.0, "preprocess_p50_ms": 2.0, "predict_one_p50_ms": p1[i],
                                          "predict_one_vs_infer_b1": p1[i] / 5.0, "classify_ips": classify[i],
                                          "errors": 0, "labels": list(labels), "probabilities": []}}}
    naive = lambda i: {"status": "ok", "pipeline": "naive", "kinds": {"dicom": {"classify_ips": 10.0 + i,
                                                                                "labels": list(labels)}}}
    reps = [{"ours": ours(i), "naive": naive(i)} for i in range(3)]
    rep = {"report_kind": "full-size", "package": {"name": "m"}, "repetitions": reps,
           "workload": {"size": [2048, 2500], "sources": "samples", "images_per_kind": 2,
                        "kinds": {"dicom": "12-bit DICOM"}}}
    rep["summary"] = summarise(reps, ["dicom"])
    return rep


def test_fullsize_summary_is_the_median_of_repetitions():
    s = fullsize_report()["summary"]["dicom"]
    assert s["classify_ips"]["median"] == 100.0 and (s["classify_ips"]["min"], s["classify_ips"]["max"]) == (95.0, 110.0)
    assert s["vs_naive"]["median"] == pytest.approx(np.median([100 / 10, 95 / 11, 110 / 12]))
    md = markdown(fullsize_report())
    assert "| 12-bit DICOM | 10.0 (9.0–12.0) |" in md and "× naive" in md


def test_fullsize_compare_uses_the_repetition_spread_and_labels():
    base = fullsize_report()
    # classify median 100 -> 80: the spread (min-max over the median) is 15% in each, 10% + 30% allowed
    ok, _, rows = compare(base, fullsize_report(classify=(80.0, 75.0, 86.0)))
    row = next(r for r in rows if r["metric"] == "full-size dicom: classify img/s")
    assert ok and row["status"] == "ok"
    ok, md, _ = compare(base, fullsize_report(classify=(50.0, 49.0, 51.0)))
    assert not ok
    ok, md, _ = compare(base, fullsize_report(labels=("covid", "pneumonia")))
    assert not ok and "labels changed: normal,pneumonia -> covid,pneumonia" in md
    with pytest.raises(ValueError, match="cannot compare a full-size report with a standard baseline"):
        compare(standard_report(), base)


def test_cli_compare_exit_codes(tmp_path, capsys):
    from cxr_edge.cli import main
    b, c = tmp_path / "base.json", tmp_path / "cur.json"
    b.write_text(json.dumps(standard_report()))
    c.write_text(json.dumps(standard_report(e2e=50.0)))
    assert main(["bench", "--compare", str(b), "--current", str(b)]) == 0
    assert main(["bench", "--compare", str(b), "--current", str(c)]) == 2
    out = capsys.readouterr().out
    assert "| openvino/int8: e2e img/s | 100.0 | 50.0 | -50.0% |" in out
    assert main(["bench", "--compare", str(tmp_path / "missing.json"), "--current", str(c)]) == 2


def test_fullsize_workload_files(tmp_path):
    from cxr_edge.bench import fullsize
    from cxr_edge.decode import decode
    from conftest import SAMPLES
    src = sorted(SAMPLES.glob("*.jpeg"))[:1]
    files = fullsize.build(src, tmp_path, n=1, size=(96, 120))
    d = decode(files["dicom"][0])
    assert d.pixels.shape == (120, 96) and d.meta["photometric"] == "MONOCHROME1" and "window" in d.meta
    p = decode(files["png16"][0])
    assert p.meta["bits"] == 16
    # the three files show the same picture (MONOCHROME1 inverted back, window over 0.5..99.5 %)
    assert np.corrcoef(d.pixels.ravel(), p.pixels.ravel())[0, 1] > 0.95
    j = decode(files["jpeg"][0])
    assert j.pixels.shape == (fullsize.JPEG_SIZE[1], fullsize.JPEG_SIZE[0])
