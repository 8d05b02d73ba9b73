"""Evidence where it runs (issue 12): typed parity results, tolerances that fail broken weights on any
CPU, the reference-set reader, on-device verification with its cache, auto's ranking, `cxr-edge
verify`, and the C SDK's tables against formats.py. Nothing here depends on the CPU family: gates
for bf16/fp16 are exercised through `judge` on probabilities measured in fp32."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxr_edge import formats
from cxr_edge.formats import TOLERANCES, wilson_lower_bound
from cxr_edge.package import ModelPackage
from cxr_edge.parity import ParityStats, Verdict, compare, judge

from conftest import sample_images

REPO = Path(__file__).resolve().parents[1]


# -- pure logic ----------------------------------------------------------------------------------
def test_wilson_lower_bound_values():
    assert wilson_lower_bound(16, 16) == pytest.approx(0.8064, abs=1e-4)
    assert wilson_lower_bound(128, 128) == pytest.approx(0.9709, abs=1e-4)
    assert wilson_lower_bound(256, 256) == pytest.approx(0.9852, abs=1e-4)
    assert wilson_lower_bound(708, 718) == pytest.approx(0.9745, abs=2e-3)
    assert wilson_lower_bound(0, 0) == 0.0


def test_every_reduced_precision_bounds_agreement_lower_bound_and_max_dp():
    for prec in ("bf16", "fp16", "int8"):
        t = TOLERANCES[prec]
        assert t.min_lower_bound is not None and t.max_abs_dp is not None, prec
    # 128 images in perfect agreement pass a reduced-precision gate; 16 never do (no evidence)
    ref = np.tile([[0.7, 0.2, 0.1]], (128, 1))
    assert judge(compare(ref, ref + 1e-4 * np.array([-1, 1, 0])), "bf16").passed
    small = judge(compare(ref[:16], ref[:16]), "bf16")
    assert not small.passed and "lower bound" in small.failures[0]


def test_parity_records_round_trip_and_read_old_records():
    st = compare(np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.0667, np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.0667)
    d = st.to_dict()
    assert d["top1_agreement"] == 0.75 and d["n"] == 4 and "lower_bound" in d
    assert ParityStats.from_dict(json.loads(json.dumps(d))) == st
    # a record as written before issue 12 (no lower_bound, no disagreements)
    old = {"n": 128, "top1_agreement": 1.0, "max_abs_dp": 0.004, "mean_abs_dp": 1e-4, "p99_abs_dp": 0.003}
    st_old = ParityStats.from_dict(old)
    assert st_old.lower_bound == pytest.approx(wilson_lower_bound(128, 128)) and st_old.disagreements == 0
    assert Verdict.from_dict({"passed": False, "skipped": "tensorrt not installed"}).skipped == "tensorrt not installed"
    assert Verdict.from_dict({"passed": True, "failures": [], "tolerance": {}}).passed
    assert not Verdict.from_dict({"passed": "yes"}).passed      # only an explicit true passes
    with pytest.raises(ValueError):
        ParityStats.from_dict({"n": 3})


def test_rank_prefers_the_more_faithful_within_the_margin():
    from cxr_edge.verify import Evidence, Speed, rank

    class C:
        def __init__(self, key, ips, dp):
            b, p = key.split("/")
            self.evidence = Evidence(b, p, source="this device",
                                     stats=ParityStats(256, 1.0, 0, wilson_lower_bound(256, 256), dp, dp / 10, dp),
                                     verdict=Verdict(True), speed=Speed(ips, 8000 / ips))
    int8, bf16, fp32 = C("openvino/int8", 293, 0.21), C("openvino/bf16", 277, 0.005), C("openvino/fp32", 151, 1e-7)
    r = rank([int8, bf16, fp32])
    assert r.order[0] is bf16 and "within 10 %" in r.reason and "more faithful" in r.reason
    r = rank([C("openvino/int8", 400, 0.21), bf16, fp32])
    assert r.order[0].evidence.key == "openvino/int8" and r.reason.startswith("fastest verified")


# -- C SDK against the formats table -------------------------------------------------------------
def test_native_sdk_tables_match_formats():
    src = (REPO / "native" / "src" / "cxr_edge.cpp").read_text()
    body = src[src.index("const char* source_precision"):src.index("std::vector<std::string> precision_order")]
    for backend in ("openvino", "tensorrt"):
        block = re.search(r'backend == "%s"\) \{(.*?)\n    \}' % backend, body, re.S).group(1)
        native = {}
        for line in block.splitlines():
            m = re.search(r'if \((.*)\) return "(\w+)";', line)
            if m:
                for run in re.findall(r'run == "(\w+)"', m.group(1)):
                    native[run] = m.group(2)
        assert native == formats.RUN_PRECISIONS[backend], backend
    order = src[src.index("std::vector<std::string> precision_order"):]
    order = order[:order.index("\n}\n")]
    trt = re.search(r'if \(backend == "tensorrt"\) return \{([^}]*)\}', order).group(1)
    ov = re.search(r'\n    return \{([^}]*)\}', order).group(1)
    assert re.findall(r'"(\w+)"', trt) == list(formats.PRECISION_ORDER["tensorrt"])
    assert re.findall(r'"(\w+)"', ov) == list(formats.PRECISION_ORDER["openvino"])
    # the C SDK's verification tolerances are generated from TOLERANCES (native/src/tolerances.hpp)
    hpp = (REPO / "native" / "src" / "tolerances.hpp").read_text()
    for prec, t in TOLERANCES.items():
        m = re.search(r'\{"%s", ([^}]*)\}' % prec, hpp)
        assert m, prec
        vals = [float(v.strip().rstrip("f")) for v in m.group(1).split(",")]
        assert vals == pytest.approx([t.min_agreement, t.min_lower_bound or 0.0, t.max_abs_dp or 1.0]), prec


# -- packages with a reference set -------------------------------------------------------------
def _variants(x: np.ndarray) -> list[np.ndarray]:
    """8 deterministic variants of a resampled 0..1 image."""
    return [x, x[:, ::-1], x[::-1, :], x.T, np.clip(x ** 0.8, 0, 1), np.clip(x ** 1.25, 0, 1),
            np.clip(0.1 + 0.8 * x, 0, 1), np.rot90(x).copy()]


def with_reference_set(src: Path, dst: Path, k: int = 128) -> Path:
    """A copy of package `src` with a reference set of k images (the 16 samples x 8 variants), whose
    probabilities come from the package's torch fp32 reference backend."""
    from cxr_edge.backends import REGISTRY
    from cxr_edge.decode import decode
    from cxr_edge.postprocess import softmax
    from cxr_edge.preprocess import normalise, resample
    shutil.copytree(src, dst)
    pkg = ModelPackage.read(dst)
    spec = pkg.preprocess
    xs = [v for p in sample_images() for v in _variants(resample(decode(p).pixels, spec))][:k]
    u16 = np.round(np.clip(np.stack(xs), 0, 1) * 65535).astype("<u2")
    (dst / "reference.u16").write_bytes(u16.tobytes())
    x = u16.astype(np.float32) / np.float32(65535)
    torch_b = REGISTRY["torch"](pkg, pkg.artifact("fp32", "onnx"), "fp32", threads=1)
    logits = np.concatenate([torch_b.infer(np.stack([normalise(v, spec) for v in x[i:i + 32]]))["logits"]
                             for i in range(0, len(x), 32)])
    pkg.reference_set = {"file": "reference.u16", "sha256": "", "bytes": 0, "shape": list(u16.shape), "scale": 65535,
                         "source": "tests: samples/ x 8 variants", "logits": logits.tolist(),
                         "probabilities": softmax(logits).tolist()}
    pkg.write()
    return dst


@pytest.fixture(scope="module")
def ref_package(tiny_package, tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return with_reference_set(tiny_package, tmp_path_factory.mktemp("ref") / "ref.cxrpkg")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("CXR_EDGE_CACHE", str(d))
    return d


def _broken(src: Path, dst: Path, scale: float) -> Path:
    """Copy of `src` whose fp32 ONNX classifier weights are multiplied by `scale` (checksums redone):
    broken weights whose top-1 mostly survives while the probabilities move."""
    import onnx
    from onnx import numpy_helper
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    gemm = [n for n in m.graph.node if n.op_type == "Gemm"][-1]
    for init in m.graph.initializer:
        if init.name in gemm.input[1:]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, init.name))
    onnx.save(m, str(dst / "model.onnx"))
    pkg = ModelPackage.read(dst, verify=False)
    pkg.write()
    return dst


def test_reference_set_reader(ref_package, tmp_path):
    from cxr_edge.verify import ReferenceSetError, read_reference_set
    pkg = ModelPackage.read(ref_package)
    rs = read_reference_set(pkg)
    assert len(rs) == 128 and rs.images.dtype == np.float32 and rs.probabilities.shape == (128, 3)
    assert 0.0 <= rs.images.min() and rs.images.max() <= 1.0
    t = rs.tensors(pkg.preprocess)
    assert t.shape == (128, 3, pkg.preprocess.size, pkg.preprocess.size) and t.dtype == np.float32
    bad = tmp_path / "bad.cxrpkg"
    shutil.copytree(ref_package, bad)
    raw = bytearray((bad / "reference.u16").read_bytes())
    raw[10] ^= 0xFF
    (bad / "reference.u16").write_bytes(bytes(raw))
    with pytest.raises(ReferenceSetError, match="checksum mismatch"):
        read_reference_set(ModelPackage.read(bad, verify=False))
    (bad / "reference.u16").write_bytes(bytes(raw[:-2]))
    with pytest.raises(ReferenceSetError, match="truncated"):
        read_reference_set(ModelPackage.read(bad, verify=False))


def test_broken_weights_fail_every_reduced_precision_gate(ref_package, tmp_path):
    """Whatever the CPU: probabilities of a broken network (computed in fp32) fail the bf16, fp16 and
    int8 gates on max |dp| even where top-1 agreement survives."""
    from cxr_edge.backends import REGISTRY
    from cxr_edge.postprocess import softmax
    from cxr_edge.verify import read_reference_set
    broken = _broken(ref_package, tmp_path / "broken.cxrpkg", 5.0)
    pkg = ModelPackage.read(broken)
    rs = read_reference_set(pkg)
    b = REGISTRY["onnxruntime"](pkg, pkg.artifact("fp32", "onnx"), "fp32", threads=1)
    probs = softmax(b.infer(rs.tensors(pkg.preprocess))["logits"])
    st = compare(rs.probabilities, probs)
    for prec in ("fp32", "bf16", "fp16", "int8"):
        v = judge(st, prec, pkg.classes, pkg.normal_class)
        assert not v.passed and any("max |dp|" in f for f in v.failures), (prec, v.failures, st)


def test_verify_on_this_device_caches_and_remeasures_unreadable_entries(ref_package, cache):
    from cxr_edge.backends import decide
    pkg = ModelPackage.read(ref_package)
    d = decide(pkg, "onnxruntime", "fp32", threads=1, measure=True, force_parity=True)
    ev = d.ranked[0].evidence
    assert "onnxruntime fp32" not in " ".join(d.skipped)
    assert ev.source == "this device" and ev.stats.n == 128 and ev.passed and ev.speed.images_per_s > 0
    assert ev.stats.max_abs_dp <= TOLERANCES["fp32"].max_abs_dp
    d.close()
    files = list((cache / "verdicts").glob("onnxruntime-fp32-*.json"))
    assert len(files) == 1
    # cached: nothing is opened the second time
    d2 = decide(pkg, "onnxruntime", "fp32", measure=True)
    assert d2.opened == {} and d2.ranked[0].evidence.cached and d2.ranked[0].evidence.source == "this device"
    # an unreadable entry is never trusted: re-measured
    files[0].write_text("{not json")
    d3 = decide(pkg, "onnxruntime", "fp32", threads=1, measure=True, force_parity=True)
    assert "onnxruntime/fp32" in d3.opened and not d3.ranked[0].evidence.cached
    d3.close()
    assert json.loads(files[0].read_text())["stats"]["n"] == 128


def test_auto_refuses_a_combination_that_failed_on_this_device(ref_package, tmp_path, cache, capsys):
    """`cxr-edge verify` on a package whose weights broke after export: exit 1, the verdict is cached,
    and auto then never picks that combination."""
    import cxr_edge
    from cxr_edge.backends import candidates
    from cxr_edge.cli import main
    broken = _broken(ref_package, tmp_path / "broken.cxrpkg", 5.0)
    rc = main(["verify", "--model", str(broken), "--backend", "onnxruntime", "--precision", "fp32", "--json",
               "--threads", "1"])
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1 and len(recs) == 1
    r = recs[0]
    assert {"backend", "precision", "source", "n", "agreement", "lower_bound", "max_abs_dp", "speed", "passed"} <= set(r)
    assert r["source"] == "this device" and r["n"] == 128 and r["passed"] is False
    found, skipped = candidates(ModelPackage.read(broken), "auto", "auto")
    assert "onnxruntime/fp32" not in [c.key for c in found]
    assert any("failed verification on this device" in s for s in skipped)
    clf = cxr_edge.load(broken, backend="auto", options={"verify": False})
    try:
        assert (clf.backend_name, clf.precision) != ("onnxruntime", "fp32")
    finally:
        clf.close()


def test_cli_verify_table_and_info_evidence(ref_package, cache, capsys):
    from cxr_edge.cli import main
    assert main(["verify", "--model", str(ref_package), "--precision", "fp32", "--threads", "1"]) in (0, 1)
    out = capsys.readouterr().out
    assert "openvino/fp32" in out and "this device on 128" in out and "img/s" in out
    assert main(["info", "--model", str(ref_package), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    ev = {f"{e['backend']}/{e['precision']}": e for e in info["evidence"]}
    assert ev["openvino/fp32"]["source"] == "this device" and ev["openvino/fp32"]["n"] == 128
    assert info["auto"]["why_chosen"]


def test_load_uses_cached_evidence(ref_package, cache):
    import cxr_edge
    clf = cxr_edge.load(ref_package, threads=1)
    try:
        assert "| evidence: " in clf.why, clf.why
        contenders = [e for e in clf.backend.evidence if e.source != "reference"]
        if len(contenders) > 1:      # auto timed them here and says so
            assert "img/s" in clf.why and "auto: fastest verified" in clf.why or "within 10 %" in clf.why, clf.why
        first = (clf.backend_name, clf.precision)
    finally:
        clf.close()
    assert list((cache / "verdicts").glob("*.json"))
    clf = cxr_edge.load(ref_package, threads=1)
    try:
        assert (clf.backend_name, clf.precision) == first
    finally:
        clf.close()


def test_gpu_paths_skip_with_reason():
    from cxr_edge.backends import REGISTRY, precision_support
    ok, why = REGISTRY["tensorrt"].available()
    if not ok:
        assert why
    for prec in ("fp16", "bf16"):
        ok, why = precision_support("torch", prec)
        if not ok:
            assert "GPU" in why or "CUDA" in why
    if not ok:
        pytest.skip(f"no GPU here: {why}")


@pytest.mark.parametrize("backend,precision,device", [("tensorrt", "fp32", None), ("tensorrt", "fp16", None),
                                                      ("torch", "fp16", None), ("torch", "bf16", None),
                                                      ("torch", "fp32", "cuda"), ("onnxruntime", "fp32", "cuda")])
def test_cuda_paths_verify_on_the_reference_set(ref_package, cache, backend, precision, device):
    """Runs only on an NVIDIA machine (bench/gpu_check.sh runs it there); elsewhere skips with the reason."""
    from cxr_edge.backends import REGISTRY, decide, precision_support
    ok, why = REGISTRY[backend].available()
    if ok:
        ok, why = precision_support(backend, precision, {"device": device} if device else None)
    if not ok:
        pytest.skip(f"{backend} {precision}: {why}")
    options = {"device": device} if device else None
    if REGISTRY[backend].target_device(precision, options) != "cuda":
        pytest.skip(f"{backend} {precision} would not run on CUDA here")
    pkg = ModelPackage.read(ref_package)
    d = decide(pkg, backend, precision, options=options, measure=True, force_parity=True)
    try:
        assert d.ranked, d.skipped
        ev = d.ranked[0].evidence
        assert ev.device == "cuda" and ev.source == "this device" and ev.stats.n == 128
        assert ev.passed, ev.verdict.failures
        b = d.opened[f"{backend}/{precision}"]
        # several requests in flight give the same results as one at a time
        from cxr_edge.verify import read_reference_set
        t = read_reference_set(pkg).tensors(pkg.preprocess)
        handles = [b.infer_async(t[i:i + 8]) for i in range(0, 32, 8)]
        together = np.concatenate([h.result()["logits"] for h in handles])
        alone = np.concatenate([b.infer(t[i:i + 8])["logits"] for i in range(0, 32, 8)])
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-3 if precision != "fp32" else 1e-5)
    finally:
        d.close()


def test_auto_compares_only_speeds_timed_together(ref_package, cache):
    """Speeds cached at different times (another load on the machine) are not compared: auto times
    its contenders again, interleaved, in one session; the next decision reuses them unopened."""
    from cxr_edge.backends import decide
    from cxr_edge.verify import Speed, load_cached, store
    pkg = ModelPackage.read(ref_package)
    d = decide(pkg, "auto", "fp32", threads=1, measure=True)
    keys = [c.key for c in d.ranked if c.evidence.source != "reference"]
    d.close()
    if len(keys) < 2:
        pytest.skip("fewer than two fp32 contenders on this machine")
    # pretend each was timed alone, at a different time: a stale, incomparable ranking
    for i, c in enumerate(c for c in d.ranked if c.key in keys):
        stale = Speed(images_per_s=1000.0 * (i + 1), median_ms=8.0 / (i + 1), session=f"stale-{i}")
        store(c.cache_key, c.evidence.stats if c.evidence.source == "this device" else None, stale)
    d2 = decide(pkg, "auto", "fp32", threads=1, measure=True)
    sessions = {c.evidence.speed.session for c in d2.ranked if c.key in keys}
    assert len(sessions) == 1 and not next(iter(sessions)).startswith("stale"), sessions
    assert set(keys) <= set(d2.opened)
    for c in d2.ranked:
        if c.key in keys:
            assert load_cached(c.cache_key)["speed"].session in sessions
    d2.close()
    d3 = decide(pkg, "auto", "fp32", threads=1, measure=True)
    assert d3.opened == {} and {c.evidence.speed.session for c in d3.ranked if c.key in keys} == sessions
    d3.close()
