"""The runtime end to end on real chest X-rays: every backend this machine has, against the torch
fp32 reference; input forms through the Classifier; JPEG draft mode; thread safety."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

import cxr_edge
from cxr_edge.backends import REGISTRY, backend_status
from cxr_edge.backends.base import BackendError
from cxr_edge.decode import decode
from cxr_edge.formats import TOLERANCES
from cxr_edge.package import ModelPackage

from conftest import CXR, sample_images, shared_images

FP32_MAX_DP = 1e-4      # the fp32 parity gate of formats.TOLERANCES, asserted here on its own
assert TOLERANCES["fp32"].max_abs_dp == FP32_MAX_DP


@pytest.fixture(scope="module")
def images() -> list[str]:
    """The 16 repository samples, then a few real images of ../shared/data/cxr when present."""
    paths = [str(p) for p in sample_images()]
    assert len(paths) == 16
    if (CXR / "manifest.csv").is_file():
        paths += [s.path for s in shared_images(6, seed=3)]
    return paths


@pytest.fixture(scope="module")
def pkg(tiny_package) -> ModelPackage:
    return ModelPackage.read(tiny_package)


@pytest.fixture(scope="module")
def clfs(pkg):
    """(backend, precision) -> an open Classifier; closed at the end of the module."""
    try:
        import torch
        before = torch.get_num_threads()
    except ImportError:
        torch = None
    opened = {}
    yield opened
    for c in opened.values():
        c.close()
    if torch is not None:
        torch.set_num_threads(before)    # the torch backend sets the process-wide thread count


def classifier(clfs, pkg, backend, precision):
    key = (backend, precision)
    if key not in clfs:
        ok, why = backend_status()[backend]
        if not ok:
            pytest.skip(f"{backend} not available here: {why}")
        # torch on one thread: a few dozen 96-px images, and idle OpenMP workers spinning on a
        # shared 2-core machine cost more than they bring
        clfs[key] = cxr_edge.load(pkg, backend=backend, precision=precision, threads=1 if backend == "torch" else None)
    return clfs[key]


def probs(results, classes) -> np.ndarray:
    bad = [r.error for r in results if not r.ok]
    assert not bad, bad
    return np.array([[r.probabilities[c] for c in classes] for r in results])


@pytest.fixture(scope="module")
def reference(clfs, pkg, images) -> np.ndarray:
    clf = classifier(clfs, pkg, "torch", "fp32")
    assert clf.backend_name == "torch" and clf.precision == "fp32"
    p = probs(clf.predict(images), pkg.classes)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    return p


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_fp32_backend_matches_torch(clfs, pkg, images, reference, backend):
    clf = classifier(clfs, pkg, backend, "fp32")
    assert (clf.backend_name, clf.precision) == (backend, "fp32")
    res = clf.predict(images)
    assert [r.source for r in res] == images                          # results in input order
    assert all(r.backend == backend and r.precision == "fp32" for r in res)
    p = probs(res, pkg.classes)
    dp = np.abs(p - reference)
    assert float(dp.max()) <= FP32_MAX_DP, f"{backend} fp32: max |dp| {dp.max():.2e} on {len(images)} real X-rays"
    assert (p.argmax(1) == reference.argmax(1)).all()
    assert [r.label for r in res] == [pkg.classes[i] for i in reference.argmax(1)]


def test_auto_choice_is_fastest_gated(clfs, pkg):
    clf = cxr_edge.load(pkg)
    clfs.setdefault((clf.backend_name, clf.precision), clf)     # reused below; closed with the others
    if clfs[(clf.backend_name, clf.precision)] is not clf:
        clf.close()
        clf = clfs[(clf.backend_name, clf.precision)]
    assert clf.why.startswith(f"chose {clf.backend_name} {clf.precision}")
    # auto ranks by speed measured here (cxr_edge.verify.rank): the why names the evidence
    ranked = [e.key for e in clf.backend.evidence]
    assert ranked[0] == f"{clf.backend_name}/{clf.precision}" and "| evidence: " in clf.why
    if len(ranked) > 1 and not ranked[0].startswith("torch/"):
        assert "auto: " in clf.why and "img/s" in clf.why
    r = clf.predict_one(sample_images()[0])
    assert r.ok and r.backend == clf.backend_name


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_int8_backend_runs_on_real_xrays(clfs, pkg, images, reference, backend):
    art = pkg.artifact("int8", "onnx-qdq")
    if art is None:
        pytest.skip("the package has no int8 artifact")
    ok, why = backend_status()[backend]
    if not ok:
        pytest.skip(f"{backend} not available here: {why}")
    key = f"{backend}/int8"
    if not art.passed_for(backend, "int8"):
        # a failed gate: the runtime must refuse it by name, and the artifact must still run
        with pytest.raises(BackendError, match="did not pass its parity gate"):
            cxr_edge.load(pkg, backend=backend, precision="int8")
        pytest.skip(f"{key} failed its parity gate in this package; refusal checked")
    clf = classifier(clfs, pkg, backend, "int8")
    assert (clf.backend_name, clf.precision) == (backend, "int8")
    res = clf.predict(images)
    p = probs(res, pkg.classes)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert (p.argmax(1) == reference.argmax(1)).mean() >= TOLERANCES["int8"].min_agreement - 1 / len(images)
    # The parity recorded in model.json (measured at export on the 16 samples) is what this
    # runtime reproduces on the same images now.
    recorded = art.parity[key]
    n = recorded["n"]
    assert n == 16
    dp = np.abs(p[:n] - reference[:n])
    assert abs(float(dp.max()) - recorded["max_abs_dp"]) <= 1e-4, (float(dp.max()), recorded["max_abs_dp"])
    assert float(dp.max()) > 1e-6          # really quantised: not the fp32 graph


def test_input_forms_agree(clfs, pkg):
    """path, bytes, PIL image and arrays of the same picture give the same result."""
    clf = classifier(clfs, pkg, "onnxruntime", "fp32")
    path = sample_images()[4]
    data = path.read_bytes()
    drafted = decode(path, min_side=pkg.preprocess.decode_hint()).pixels   # what a path gives the model
    with Image.open(path) as im:
        pil = im.convert("L")
    full8 = np.asarray(pil)
    res = clf.predict([path, str(path), data, drafted, pil, full8, full8.astype(np.float32) / 255,
                       full8.astype(np.uint16) * 257])
    assert all(r.ok for r in res[:7]), [r.error for r in res]
    p = probs(res[:7], pkg.classes)
    # path, str, bytes and the draft-decoded array: same pixels, same numbers
    np.testing.assert_allclose(p[1:4], np.repeat(p[:1], 3, 0), atol=1e-7)
    # PIL, uint8 and float arrays (full resolution, no draft): same numbers among themselves
    np.testing.assert_allclose(p[5:7], np.repeat(p[4:5], 2, 0), atol=1e-6)
    assert res[0].source == str(path) and res[2].source == "<bytes>"
    # uint16 without bits_stored: an error row naming the fix, not an exception
    assert not res[7].ok and "bits_stored" in res[7].error
    # a single input (not in a list) is one result
    assert len(clf.predict(path)) == 1 and len(clf.predict(full8)) == 1


def test_draft_mode_keeps_results_close(clfs, pkg, tmp_path):
    """A big JPEG is decoded in the DCT domain at 1/8 size; its classification stays close to the
    full-resolution decode (the model input is 96 px either way)."""
    clf = classifier(clfs, pkg, "openvino", "fp32")
    big = []
    for i, src in enumerate(sample_images()[::4]):
        with Image.open(src) as im:
            p = tmp_path / f"big{i}.jpg"
            im.convert("L").resize((2400, 1900), Image.BILINEAR).save(p, quality=92)
            big.append(p)
    hint = pkg.preprocess.decode_hint()
    drafted = [decode(p, min_side=hint) for p in big]
    full = [decode(p) for p in big]
    assert all(d.pixels.shape[0] * 4 <= f.pixels.shape[0] for d, f in zip(drafted, full))   # really smaller
    assert all(min(d.pixels.shape) >= hint for d in drafted)
    pd = probs(clf.predict(big), pkg.classes)                         # paths: draft mode
    pf = probs(clf.predict([f.pixels for f in full]), pkg.classes)    # full-resolution pixels
    dp = np.abs(pd - pf).max(1)
    # "close": far below how much these outputs differ between different radiographs
    between = np.abs(pf[:, None, :] - pf[None, :, :]).max(2)[np.triu_indices(len(pf), 1)]
    assert float(dp.max()) < 0.02, dp
    assert float(dp.max()) < 0.5 * float(between.min()) or float(dp.max()) < 2e-3, (dp, between)
    assert (pd.argmax(1) == pf.argmax(1)).all()


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime", "torch"])
def test_one_classifier_from_four_threads(clfs, pkg, images, backend):
    clf = classifier(clfs, pkg, backend, "fp32")
    imgs = images[:12]
    serial = probs(clf.predict(imgs), pkg.classes)
    # each thread classifies the same images in its own rotation: a mixed-up result shows
    orders = [imgs[i * 3:] + imgs[:i * 3] for i in range(4)]
    out, errors = [None] * 4, []
    start = threading.Barrier(4)

    def work(i):
        try:
            start.wait()
            for _ in range(1 if backend == "torch" else 2):
                res = clf.predict(orders[i])
                assert [r.source for r in res] == orders[i]
                out[i] = probs(res, pkg.classes)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), f"{backend}: threads still waiting after 300 s (deadlock)"
    assert not errors, errors
    for i in range(4):
        back = np.roll(out[i], i * 3, axis=0)                          # undo the rotation
        np.testing.assert_allclose(back, serial, atol=1e-6, err_msg=f"{backend} thread {i}")


def test_bad_inputs_do_not_stop_the_batch(clfs, pkg, tmp_path):
    clf = classifier(clfs, pkg, "onnxruntime", "fp32")
    empty = tmp_path / "empty.jpeg"
    empty.write_bytes(b"")
    good = sample_images()[:2]
    res = clf.predict([good[0], empty, tmp_path / "missing.png", b"garbage bytes", good[1]])
    assert [r.status for r in res] == ["ok", "error", "error", "error", "ok"]
    assert "empty file" in res[1].error and "file not found" in res[2].error and "not a recognised" in res[3].error
    assert all(r.label is None and r.probabilities == {} for r in res[1:4])


def test_backend_registry_reports_itself():
    status = backend_status()
    assert {"openvino", "onnxruntime", "torch", "tensorrt"} <= set(status)
    for name, (ok, why) in status.items():
        assert isinstance(ok, bool) and why, name
        assert REGISTRY[name].available() == (ok, why)


def test_openvino_latency_mode_streams_many_batches(pkg):
    """LATENCY mode gives one infer request; the pipelined stream keeps a batch in flight while it
    submits the next, which must not wait forever for that one request."""
    if not backend_status()["openvino"][0]:
        pytest.skip("openvino not available here")
    clf = cxr_edge.load(pkg, backend="openvino", precision="fp32", batch_size=2, options={"throughput": False})
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", clf.predict(sample_images()[:6])), daemon=True)
    t.start()
    t.join(240)
    try:
        assert not t.is_alive(), "3 batches through a 1-request OpenVINO model did not finish (deadlock)"
        assert [r.ok for r in out["r"]] == [True] * 6
    finally:
        if not t.is_alive():
            clf.close()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_openvino_latency_engine_for_one_input_gives_the_same_outputs(default_package, precision):
    """predict_one runs its batch of one on a second OpenVINO compilation with the LATENCY hint (one
    stream over every core; THROUGHPUT mode gives one request one core). Same artifact, same inference
    precision: the same logits and features as the throughput engine, and the same Result, from four
    threads at once too."""
    if not backend_status()["openvino"][0]:
        pytest.skip("openvino not available here")
    clf = cxr_edge.load(default_package, backend="openvino", precision=precision)
    b = clf.backend
    assert b._latency_engine is None                                   # compiled on first use only
    x = np.stack([clf._prepare(p)[0] for p in sample_images()[:3]])
    for i in range(len(x)):
        a, c = b.infer(x[i:i + 1], features=True), b.infer_one_async(x[i:i + 1], features=True).result()
        assert set(a) == set(c) == {"logits", "features"}
        for k in a:
            np.testing.assert_allclose(c[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    assert b._latency_engine is not None and b._latency_engine is not b._engine
    images = sample_images()[:4]
    batch = {r.source: r for r in clf.predict(images)}
    singles = {}
    threads = [threading.Thread(target=lambda p=p: singles.setdefault(str(p), clf.predict_one(p))) for p in images]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert set(singles) == set(batch)
    for src, r in singles.items():
        assert r.label == batch[src].label and r.warnings == batch[src].warnings
        np.testing.assert_allclose(list(r.probabilities.values()), list(batch[src].probabilities.values()), atol=1e-5)
    assert "<" not in b.describe() and "inference precision f32" in b.describe()
    clf.close()
    # closed: both compiled models are released, and every path says so instead of quietly reopening
    for call in (lambda: clf.predict_one(images[0]), lambda: clf.predict(images[:1]),
                 lambda: b.infer(x[:1]), lambda: b.infer_one_async(x[:1])):
        with pytest.raises(BackendError, match="closed"):
            call()


def test_predict_one_refuses_a_bad_explain_like_predict(clfs, pkg):
    """A class name that is not one of the package's is the caller's error in both paths (ValueError),
    not an inference failure of the input."""
    clf = classifier(clfs, pkg, "onnxruntime", "fp32")
    with pytest.raises(ValueError, match="bogus"):
        clf.predict([sample_images()[0]], explain="bogus")
    with pytest.raises(ValueError, match="bogus"):
        clf.predict_one(sample_images()[0], explain="bogus")
