"""Issue 17 at run time: calibration temperature, operating points and the input guard
(cxr_edge/guard.py) through the real Classifier on the shipped default model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CXR_DICOM, sample_images

import cxr_edge
from cxr_edge.guard import (GUARD_FILE, GapMahalanobis, Guard, OperatingPointError, header_warnings, ood_score,
                            pool_features)
from cxr_edge.package import ModelPackage, PackageError, guard_records


def _package_with(tmp_path: Path, default_package: Path, **keys) -> Path:
    """A copy of the default package (files copied, never linked) whose model.json carries the
    given top-level keys; a guard parameter file the new keys no longer list is removed."""
    out = tmp_path / "pkg.cxrpkg"
    shutil.copytree(default_package, out)
    meta = json.loads((out / "model.json").read_text())
    old = {rec["file"] for _, rec in guard_records(meta.get("input_guard"))}
    meta.update(keys)
    for name in old - {rec["file"] for _, rec in guard_records(meta.get("input_guard"))}:
        (out / name).unlink()
    (out / "model.json").write_text(json.dumps(meta))
    return out


def _load(pkg, **kw):
    return cxr_edge.load(pkg, backend="onnxruntime", precision="fp32", **kw)


def test_header_warnings_rules():
    assert header_warnings({"format": "DICOM", "modality": "DX", "body_part": "CHEST", "view_position": "PA"}, "a") == []
    assert header_warnings({}, "a") == []
    w = header_warnings({"format": "DICOM", "body_part": "RIBCAGE", "view_position": "LL", "modality": "DX"}, "a.dcm")
    assert len(w) == 2 and all(x.startswith("a.dcm: ") for x in w)
    assert "RIBCAGE" in w[0] and "LL" in w[1]
    assert "CT" in header_warnings({"format": "DICOM", "modality": "CT"}, "b")[0]


def test_ood_score_is_logsumexp():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(ood_score(z), np.log(np.exp(z).sum(1)))
    np.testing.assert_allclose(ood_score(z, 2.0), 2.0 * 0 + np.log(np.exp(z / 2).sum(1)))


def test_temperature_and_operating_point(tmp_path, default_package):
    base = _load(default_package)
    plain = base.predict(sample_images()[:6])
    pkg = _package_with(tmp_path, default_package, calibration={"temperature": 2.0},
                        operating_points={"sensitive": {"normal_min_probability": 0.999}})
    calibrated = _load(pkg).predict(sample_images()[:6])
    for a, b in zip(plain, calibrated):
        p = np.array(list(a.probabilities.values()))
        q = np.array(list(b.probabilities.values()))
        want = np.sqrt(p) / np.sqrt(p).sum()           # softmax(z / 2) = p^(1/2), renormalised
        np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-7)
        assert a.label == b.label                        # a temperature never changes the argmax
    sens = _load(pkg, operating_point="sensitive").predict(sample_images()[:6])
    # p(normal) >= 0.999 at T=2 is out of reach for these images: every one is called a disease,
    # the most probable one, with the probabilities unchanged
    for b, s in zip(calibrated, sens):
        assert s.label != "normal"
        assert s.probabilities == b.probabilities
        disease = {k: v for k, v in b.probabilities.items() if k != "normal"}
        assert s.label == max(disease, key=disease.get)


def test_unknown_operating_point_is_refused(tmp_path, default_package):
    with pytest.raises(OperatingPointError, match="'nope' is not defined.*defined: sensitive"):
        _load(default_package, operating_point="nope")
    bare = _package_with(tmp_path, default_package, operating_points={})
    with pytest.raises(OperatingPointError, match="'sensitive' is not defined.*defined: none"):
        _load(bare, operating_point="sensitive")
    from cxr_edge.cli import main
    rc = main(["classify", str(sample_images()[0]), "--operating-point", "nope", "--backend", "onnxruntime"])
    assert rc != 0


def test_ood_threshold_warns(tmp_path, default_package):
    pkg = _package_with(tmp_path, default_package, input_guard={"warn_below": 1e6})
    res = _load(pkg).predict([sample_images()[0], np.full((64, 64), 0.5, np.float32)])
    assert all(any("does not look like a frontal chest radiograph" in w for w in r.warnings) for r in res)
    res = _load(default_package).predict([sample_images()[0]])
    assert not any("frontal chest" in w for w in res[0].warnings)   # no input_guard: header checks only


def test_package_round_trip_keeps_keys(tmp_path, default_package):
    keys = {"calibration": {"temperature": 1.5}, "operating_points": {"sensitive": {"normal_min_probability": 0.8}},
            "input_guard": {"warn_below": 1.0}}
    pkg = cxr_edge.ModelPackage.read(_package_with(tmp_path, default_package, **keys))
    pkg.write()
    again = cxr_edge.ModelPackage.read(pkg.root)
    assert (again.calibration, again.operating_points, again.input_guard) == tuple(keys.values())
    g = Guard(again, "sensitive")
    assert g.temperature == 1.5 and g.normal_min == 0.8
    # two-sided OOD score: below warn_below or above warn_above warns (logsumexp(z / 1.5))
    again.input_guard = {"warn_below": 1.0, "warn_above": 5.0}
    g = Guard(again)
    assert g.warnings(np.array([0.0, 0.0, 0.0]), {}, "x") == []                      # 1.5 * 0 + log 3 = 1.10
    assert "< 1.00" in g.warnings(np.array([-3.0, -3.0, -3.0]), {}, "x")[0]
    assert "> 5.00" in g.warnings(np.array([9.0, 0.0, 0.0]), {}, "x")[0]
    again.calibration = {"temperature": -1}
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        Guard(again)


def test_dicom_header_guard_on_real_files(default_package):
    files = CXR_DICOM / "files"
    if not files.is_dir():
        pytest.skip(f"real DICOM samples not found at {files} (../shared/data/cxr-dicom beside the checkout)")
    pytest.importorskip("pydicom")
    res = _load(default_package).predict([files / "udacity_test1.dcm", files / "udacity_test4.dcm"])
    assert not any("BodyPartExamined" in w for w in res[0].warnings)
    assert any("BodyPartExamined is RIBCAGE" in w and "udacity_test4.dcm" in w for w in res[1].warnings)


# -- the Mahalanobis guard (Lee et al. 2018) on pooled features ---------------------------------------
MAHALANOBIS_WARNING = "Mahalanobis distance"


def test_gap_mahalanobis_is_the_shrunk_covariance_distance():
    """The compact precision (a I - U U^T) gives the distances of the explicitly inverted shrunk
    covariance, with fewer images than channels (singular sample covariance) and more."""
    rng = np.random.default_rng(0)
    for n, c in ((40, 60), (300, 12)):
        y = np.arange(n) % 3
        f = rng.normal(0, 1, (n, c)) * rng.uniform(0.2, 3, c) + y[:, None]
        g = GapMahalanobis.fit(f, y, 3, shrinkage=0.1)
        mus = np.stack([f[y == k].mean(0) for k in range(3)])
        cov = np.cov(f - mus[y], rowvar=False)
        prec = np.linalg.inv(0.9 * cov + 0.1 * np.trace(cov) / c * np.eye(c))
        x = rng.normal(0, 2, (7, c))
        want = np.stack([np.einsum("ij,jk,ik->i", x - m, prec, x - m) for m in mus], 1)
        np.testing.assert_allclose(g.distances(x), want, rtol=1e-6)      # the projection runs in float32
        np.testing.assert_allclose(g.score(x), -want.min(1), rtol=1e-6)
        assert g.rank <= min(c, n - 3)
        # the float32 file round trip, and (N, C, h, w) maps pooled as the network's head does
        back = GapMahalanobis.from_bytes(g.to_bytes(), 3, c, g.rank, g.isotropic_precision)
        np.testing.assert_allclose(back.score(x), g.score(x), rtol=1e-5)
        maps = np.repeat(x[:, :, None, None], 4, 2).repeat(4, 3)
        np.testing.assert_allclose(g.score(maps), g.score(x), rtol=1e-12)
        rec = g.record()
        assert len(g.to_bytes()) == 4 * (rec["classes"] * rec["channels"] + rec["channels"] * rec["rank"])
    with pytest.raises(ValueError, match="classes without fitting images: \\[2\\]"):
        GapMahalanobis.fit(rng.normal(size=(10, 4)), np.arange(10) % 2, 3)
    with pytest.raises(ValueError, match="bytes"):
        GapMahalanobis.from_bytes(b"\0" * 12, 3, 4, 1, 1.0)
    with pytest.raises(ValueError, match="channels"):
        g.score(np.zeros((1, c + 1)))
    np.testing.assert_array_equal(pool_features(np.ones((2, 3, 4, 5))), np.ones((2, 3)))


def _reference_features(package_dir: Path):
    """Feature maps (n, C, h, w) of a package's reference set (real X-rays: the 16 samples and
    variants of them, preprocessed) through ONNX Runtime fp32, and the torch reference's argmax
    class for each."""
    from cxr_edge.backends import REGISTRY
    from cxr_edge.verify import read_reference_set
    pkg = ModelPackage.read(package_dir)
    x = read_reference_set(pkg).tensors(pkg.preprocess)
    backend = REGISTRY["onnxruntime"](pkg, pkg.artifact("fp32", "onnx"), "fp32")
    try:
        feats = np.concatenate([backend.infer(x[i:i + 16], features=True)["features"] for i in range(0, len(x), 16)])
    finally:
        backend.close()
    return feats, np.asarray(pkg.reference_set["logits"]).argmax(1)


@pytest.fixture(scope="module")
def guarded_package(tmp_path_factory, default_package) -> Path:
    """A copy of the default package with a Mahalanobis input guard fitted here on its own
    reference set (the shipped file, if any, is replaced): parameters from its 136 real X-rays,
    threshold four times the lowest of their scores (generated images score 20x lower and more). The reference set holds no covid image: covid gets a
    copy of another class's mean, which leaves the smallest distance unchanged."""
    feats, y = _reference_features(default_package)
    present = sorted(set(y.tolist()))
    two = GapMahalanobis.fit(feats, np.searchsorted(present, y), len(present))
    means = np.stack([two.means[present.index(k)] if k in present else two.means[0] for k in range(3)])
    params = GapMahalanobis(means, two.correction, two.isotropic_precision)
    out = tmp_path_factory.mktemp("guarded") / "guarded.cxrpkg"
    shutil.copytree(default_package, out)                   # copies: nothing written reaches the shipped files
    for _, rec in guard_records(ModelPackage.read(out).input_guard):   # the shipped guards (fp32, int8) go
        (out / rec["file"]).unlink()
    (out / GUARD_FILE).write_bytes(params.to_bytes())
    pkg = ModelPackage.read(out, verify=False)
    shipped = GapMahalanobis.from_bytes(params.to_bytes(), 3, params.channels, params.rank, params.isotropic_precision)
    pkg.input_guard = {"warn_below": round(4 * float(shipped.score(feats).min()), 4), "mahalanobis": params.record()}
    pkg.write()                                             # stamps the file's sha256 and bytes
    return out


def _generated(tmp_path: Path, kinds=("text_page", "uniform_noise", "checkerboard", "stripes")) -> list[Path]:
    """Generated non-radiographs (kinds of train/calibrate.synthetic_image; the runtime tests do not
    import the workbench) as PNG files."""
    from PIL import Image
    out = []
    r = np.random.default_rng(3)
    for kind in kinds:
        yy, xx = np.mgrid[0:256, 0:256] / 256
        img = {"text_page": None, "uniform_noise": r.uniform(0, 1, (256, 256)),
               "checkerboard": ((np.floor(xx * 6) + np.floor(yy * 6)) % 2), "stripes": 0.5 + 0.5 * np.sin(xx * 40)}[kind]
        if img is None:
            from PIL import ImageDraw
            page = Image.new("L", (256, 256), 255)
            d = ImageDraw.Draw(page)
            for y in range(4, 246, 12):
                d.text((4, y), "patient report findings dose mAs 2026 lorem ipsum", fill=0)
            img = np.asarray(page) / 255.0
        p = tmp_path / f"{kind}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(p)
        out.append(p)
    return out


def test_mahalanobis_guard_warns_on_generated_images_not_on_samples(guarded_package, tmp_path):
    clf = _load(guarded_package)
    assert clf.guard.needs_features
    samples = clf.predict(sample_images())
    assert [r.source for r in samples if any(MAHALANOBIS_WARNING in w for w in r.warnings)] == []
    assert all(r.error is None for r in samples)
    generated = _generated(tmp_path)
    for r, path in zip(clf.predict(generated), generated):
        hits = [w for w in r.warnings if MAHALANOBIS_WARNING in w]
        assert len(hits) == 1 and hits[0].startswith(f"{r.source}: does not look like a frontal chest radiograph")
        assert path.name in r.source                      # the warning names the input
    one = clf.predict_one(generated[0])                   # the single-image path scores features too
    assert any(MAHALANOBIS_WARNING in w for w in one.warnings)
    clf.close()


def test_tampered_guard_file_is_refused(guarded_package, tmp_path):
    bad = tmp_path / "tampered.cxrpkg"
    shutil.copytree(guarded_package, bad)
    raw = bytearray((bad / GUARD_FILE).read_bytes())
    raw[100] ^= 0x01                                      # same size, one bit: only the checksum can tell
    (bad / GUARD_FILE).write_bytes(bytes(raw))
    with pytest.raises(PackageError, match=f"input_guard.mahalanobis file {GUARD_FILE} checksum mismatch"):
        ModelPackage.read(bad)
    with pytest.raises(PackageError, match="checksum mismatch"):
        _load(bad)
    # read without verification, the guard still hashes the bytes it parses
    with pytest.raises(PackageError, match="checksum mismatch"):
        Guard(ModelPackage.read(bad, verify=False))
    (bad / GUARD_FILE).unlink()
    with pytest.raises(PackageError, match=f"{GUARD_FILE} listed in model.json is missing"):
        ModelPackage.read(bad)
    # a guard file model.json does not list is refused like any unlisted weights file
    (bad / GUARD_FILE).write_bytes(bytes(raw))
    meta = json.loads((bad / "model.json").read_text())
    meta["input_guard"].pop("mahalanobis")
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=f"{GUARD_FILE} is in the package but not listed"):
        ModelPackage.read(bad)
    # a record whose size does not fit its shape fields
    meta = json.loads((guarded_package / "model.json").read_text())
    meta["input_guard"]["mahalanobis"]["rank"] -= 1
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="input_guard.mahalanobis.bytes: .* is not 4 x"):
        ModelPackage.read(bad)


def test_package_without_guard_file_keeps_the_energy_guard(tmp_path, default_package):
    """No parameter file: no feature map is requested and no Mahalanobis warning appears; the energy
    thresholds of earlier packages still apply (here v1's: 1.0833 / 6.3546)."""
    pkg = _package_with(tmp_path, default_package, input_guard={"warn_below": 1.0833, "warn_above": 6.3546})
    assert not (pkg / GUARD_FILE).exists()
    clf = _load(pkg)
    assert not clf.guard.needs_features
    res = clf.predict(sample_images()[:4] + _generated(tmp_path, ("uniform_noise", "checkerboard")))
    assert not any(MAHALANOBIS_WARNING in w for r in res for w in r.warnings)
    assert not any(r.warnings for r in res[:4])
    assert all(any("out-of-distribution score" in w for w in r.warnings) for r in res[4:])   # energy, as in v1
    clf.close()


def _int8_guard(default_package):
    entry = ((ModelPackage.read(default_package).input_guard or {}).get("by_precision") or {}).get("int8")
    if not entry:
        pytest.skip("the default package has no int8 input guard (train/calibrate.py precision)")
    return entry


def test_an_int8_run_scores_with_the_guard_fitted_on_int8_features(tmp_path, default_package):
    """The shipped package carries a guard fitted on its int8 artifact's features: an int8 run uses
    its parameters and threshold, an fp32 run the fp32 guard."""
    entry = _int8_guard(default_package)
    fp32, int8 = _load(default_package), cxr_edge.load(default_package, backend="onnxruntime", precision="int8")
    fp32_rec = ModelPackage.read(default_package).input_guard
    assert fp32.guard.warn_below == fp32_rec["warn_below"] != int8.guard.warn_below == entry["warn_below"]
    assert int8.guard.mahalanobis.isotropic_precision == entry["mahalanobis"]["isotropic_precision"]
    assert fp32.guard.mahalanobis.isotropic_precision == fp32_rec["mahalanobis"]["isotropic_precision"]
    g = Guard(ModelPackage.read(default_package))
    g.use_precision("int8")
    g.use_precision("bf16")                               # no bf16 guard: back to the fp32 one
    assert (g.warn_below, g.mahalanobis.isotropic_precision) == (fp32.guard.warn_below,
                                                                 fp32.guard.mahalanobis.isotropic_precision)
    images = sample_images()[:4]
    plain = [r.warnings for r in int8.predict(images)]
    # the int8 entry's threshold is what an int8 run compares with: set above every score, every int8
    # result warns; the fp32 results do not change
    guard = json.loads((default_package / "model.json").read_text())["input_guard"]
    guard["by_precision"]["int8"]["warn_below"] = 1e12
    pkg = _package_with(tmp_path, default_package, input_guard=guard)
    warned = cxr_edge.load(pkg, backend="onnxruntime", precision="int8").predict(images)
    assert all(any(MAHALANOBIS_WARNING in w for w in r.warnings) for r in warned)
    assert not all(any(MAHALANOBIS_WARNING in w for w in ws) for ws in plain)   # so the threshold made them warn
    assert [r.warnings for r in _load(pkg).predict(images)] == [r.warnings for r in fp32.predict(images)]


def test_tampered_int8_guard_file_is_refused(tmp_path, default_package):
    entry = _int8_guard(default_package)
    name = entry["mahalanobis"]["file"]
    bad = tmp_path / "bad.cxrpkg"
    shutil.copytree(default_package, bad)
    raw = bytearray((bad / name).read_bytes())
    raw[7] ^= 0x01
    (bad / name).write_bytes(bytes(raw))
    with pytest.raises(PackageError, match=f"input_guard.by_precision.int8.mahalanobis file {name} checksum mismatch"):
        ModelPackage.read(bad)
    g = Guard(ModelPackage.read(bad, verify=False))    # the fp32 guard reads; the int8 one is hashed when used
    with pytest.raises(PackageError, match="checksum mismatch"):
        g.use_precision("int8")
