"""Near-tie flags (margin / uncertain), the reference-set writer, calibration picking and the int8
record of an export (issue 15)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cxr_edge import nearties
from cxr_edge.postprocess import Result
from cxr_edge.sinks import CsvSink, JsonlSink, TableSink, columns

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


# -- the near-tie rule -------------------------------------------------------------------------------
def test_margins_are_top1_minus_top2():
    p = np.array([[0.49, 0.51, 0.0], [0.2, 0.7, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(nearties.margins(p), [0.02, 0.5, 0.0], atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        nearties.margins(np.array([0.5, 0.5]))


def test_threshold_is_twice_the_measured_p99_and_fp32_only_flags_coin_flips():
    art = SimpleNamespace(parity={"openvino/int8": {"p99_abs_dp": 0.02}, "onnxruntime/int8": {"p99_abs_dp": 0.03},
                                  "openvino/fp32": {"p99_abs_dp": 2e-7}})
    assert nearties.threshold(art, "openvino", "int8") == pytest.approx(0.04)
    # not measured on this backend: the worst measured backend at that precision stands in
    assert nearties.threshold(art, "tensorrt", "int8") == pytest.approx(0.06)
    assert nearties.threshold(art, "openvino", "fp32") == nearties.EPS
    assert nearties.threshold(art, "torch", "fp32") == nearties.EPS
    assert nearties.threshold(SimpleNamespace(parity={}), "openvino", "int8") is None
    m, u = nearties.flag(np.array([[0.49, 0.51, 0.0], [0.1, 0.9, 0.0]]), 0.04)
    assert u == [True, False]
    assert nearties.flag(np.array([[0.49, 0.51, 0.0]]), None)[1] == [None]


def test_sources_and_near_ties_counts_flips_the_rule_misses():
    ref = np.array([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0], [0.505, 0.495, 0.0], [0.2, 0.8, 0.0]])
    cand = np.array([[0.3, 0.7, 0.0], [0.9, 0.1, 0.0], [0.495, 0.505, 0.0], [0.2, 0.8, 0.0]])
    out = nearties.sources_and_near_ties(ref, cand, ["a", "a", "b", "b"], "openvino", "int8")
    assert out["by_source"] == {"a": {"n": 2, "agreement": 0.5, "disagreements": 1},
                                "b": {"n": 2, "agreement": 0.5, "disagreements": 1}}
    # p99 of per-image max |dp| is ~0.29, threshold ~0.59: the near-tie flip (margin 0.01) is flagged;
    # the gross flip (candidate margin 0.4 < 0.59) is flagged too; the confident images (margin 0.6) are not
    d99 = np.quantile([0.3, 0.0, 0.01, 0.0], 0.99)
    assert out["near_tie_threshold"] == pytest.approx(2 * d99)
    assert out["uncertain"] == 2 and out["flips_not_uncertain"] == 0
    ref2 = np.array([[0.9, 0.1, 0.0]] * 99 + [[0.55, 0.45, 0.0]])
    cand2 = np.array([[0.9, 0.1, 0.0]] * 99 + [[0.05, 0.95, 0.0]])  # one gross flip beyond the p99
    out2 = nearties.sources_and_near_ties(ref2, cand2, [], "openvino", "int8")
    assert out2["flips_not_uncertain"] == 1  # the rule is not a bound; the miss is counted
    torch_out = nearties.sources_and_near_ties(ref, ref, [], "torch", "fp32")
    assert "by_source" not in torch_out and torch_out["uncertain"] == 0


# -- Result and sinks ----------------------------------------------------------------------------------
def _results():
    ok = Result("a.png", label="normal", probabilities={"covid": 0.0, "normal": 0.51, "pneumonia": 0.49},
                backend="openvino", precision="int8", margin=0.02, uncertain=True)
    sure = Result("b.png", label="covid", probabilities={"covid": 0.9, "normal": 0.05, "pneumonia": 0.05},
                  backend="openvino", precision="int8", margin=0.85, uncertain=False)
    bad = Result("c.png", error="c.png: not an image", backend="openvino", precision="int8")
    return [ok, sure, bad]


def test_sink_columns_put_margin_and_uncertain_between_precision_and_error():
    cols = columns(["covid", "normal", "pneumonia"])
    assert cols.index("precision") < cols.index("margin") < cols.index("uncertain") < cols.index("error")


def test_csv_and_jsonl_carry_margin_and_uncertain():
    classes = ["covid", "normal", "pneumonia"]
    buf = io.StringIO()
    s = CsvSink(buf, classes)
    for r in _results():
        s.write(r)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["uncertain"] for r in rows] == ["true", "false", ""]
    assert rows[0]["margin"] == "0.020000" and rows[2]["margin"] == ""
    buf = io.StringIO()
    s = JsonlSink(buf, classes)
    for r in _results():
        s.write(r)
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [r["uncertain"] for r in recs] == [True, False, None]
    assert recs[1]["margin"] == 0.85


def test_table_marks_uncertain_results_and_explains_the_mark():
    buf = io.StringIO()
    s = TableSink(buf, ["covid", "normal", "pneumonia"])
    for r in _results():
        s.write(r)
    s.close()
    lines = buf.getvalue().splitlines()
    assert "0.020*" in lines[1] and "*" not in lines[2].split("b.png")[0]
    assert lines[-1].startswith("* uncertain (1)")


# -- reference set -----------------------------------------------------------------------------------
def test_reference_encoding_round_trips_within_half_a_step():
    from cxr_edge.export.reference_set import SCALE, decode_u16, encode
    x = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    u = encode(x)
    assert u.dtype == np.dtype("<u2") and u.shape == x.shape
    assert np.abs(decode_u16(u) - x).max() <= 0.5 / SCALE + 1e-7
    assert encode(np.array([[[-0.5, 1.5]]])).tolist() == [[[0, SCALE]]]
    with pytest.raises(ValueError, match="K, H, W"):
        encode(np.zeros((8, 8)))


def test_sample_variants_are_deterministic_and_distinct():
    pytest.importorskip("PIL")
    from cxr_edge.export.reference_set import VARIANTS, sample_variants
    from cxr_edge.preprocess import PreprocessSpec
    spec = PreprocessSpec(size=64, resize="stretch", channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    paths = sorted(SAMPLES.glob("*.jpeg"))[:2]
    a, names = sample_variants(paths, spec)
    b, _ = sample_variants(paths, spec)
    assert a.shape == (2 * len(VARIANTS), 64, 64) and len(names) == len(a)
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    flat = a.reshape(len(a), -1)
    assert len({row.tobytes() for row in flat}) == len(a)  # no variant equals another


def test_pick_calibration_balances_sources():
    pytest.importorskip("torch")
    from cxr_edge.export.pipeline import pick_calibration
    items = [SimpleNamespace(source="big") for _ in range(90)] + [SimpleNamespace(source="small") for _ in range(10)]
    pick = pick_calibration(items, 20, by_source=True)
    assert len(pick) == 20 and len(set(pick)) == 20
    assert sum(items[i].source == "small" for i in pick) == 10
    assert pick == pick_calibration(items, 20, by_source=True)
    rand = pick_calibration(items, 20)
    assert len(rand) == 20 and rand == sorted(rand)


# -- a real export ------------------------------------------------------------------------------------
def test_export_writes_reference_set_and_int8_record(tiny_package):
    import torch
    from cxr_edge.export.reference_set import decode_u16
    from cxr_edge.package import ModelPackage
    from cxr_edge.preprocess import normalise
    pkg = ModelPackage.read(tiny_package)
    rs = pkg.reference_set
    k, h, w = rs["shape"]
    assert rs["file"] == "reference.u16" and rs["scale"] == 65535 and h == w == pkg.preprocess.size
    assert 0 < k <= 16 and "parity set" in rs["source"]  # the samples are the whole parity set here
    u16 = np.fromfile(tiny_package / rs["file"], dtype="<u2").reshape(k, h, w)
    # the recorded logits are torch fp32 on normalise(u16 / 65535): recompute with the torch backend
    from cxr_edge.backends import REGISTRY
    b = REGISTRY["torch"](pkg, pkg.artifact("fp32", "onnx"), "fp32")
    x = np.stack([normalise(v, pkg.preprocess) for v in decode_u16(u16)])
    np.testing.assert_allclose(b.infer(x)["logits"], np.array(rs["logits"]), atol=1e-4)
    np.testing.assert_allclose(np.array(rs["probabilities"]).sum(1), 1.0, atol=1e-6)
    del torch
    int8 = pkg.artifact("int8", "onnx-qdq")
    assert int8.extra["method"].startswith("nncf.quantize") and int8.extra["calibration_images"] == 16
    for key, par in int8.parity.items():
        assert {"near_tie_threshold", "uncertain", "flips_not_uncertain", "lower_bound"} <= set(par), key


def test_classifier_results_carry_margin_and_uncertain(tiny_package):
    import cxr_edge
    with cxr_edge.load(str(tiny_package), backend="onnxruntime", precision="fp32") as clf:
        rs = clf.predict(sorted(str(p) for p in SAMPLES.glob("*.jpeg"))[:3] + [b"not an image"])
    for r in rs[:3]:
        p = sorted(r.probabilities.values())
        assert r.margin == pytest.approx(p[-1] - p[-2])
        assert r.uncertain is (r.margin < nearties.EPS)
    assert rs[3].margin is None and rs[3].uncertain is None


def test_bench_parity_cells_show_uncertain_and_per_source():
    from cxr_edge.bench.report import _by_source_cell, _uncertain_cell
    par = {"uncertain": 3, "flips_not_uncertain": 1,
           "by_source": {"nih": {"n": 10, "agreement": 0.9, "disagreements": 1}, "cohen": {"n": 4, "agreement": 1.0, "disagreements": 0}}}
    assert _uncertain_cell(par) == "3 (1 flips unflagged)"
    assert _by_source_cell(par) == "nih 9/10, cohen 4/4"
    assert _uncertain_cell({}) == "–" and _by_source_cell({}) == "–"
