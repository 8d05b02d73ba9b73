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
from cxr_edge.guard import Guard, OperatingPointError, header_warnings, ood_score


def _package_with(tmp_path: Path, default_package: Path, **keys) -> Path:
    """A copy of the default package whose model.json carries the given top-level keys."""
    out = tmp_path / "pkg.cxrpkg"
    shutil.copytree(default_package, out)
    meta = json.loads((out / "model.json").read_text())
    meta.update(keys)
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
        pytest.skip(f"DICOM samples not found at {files} (../shared/data absent)")
    pytest.importorskip("pydicom")
    res = _load(default_package).predict([files / "udacity_test1.dcm", files / "udacity_test4.dcm"])
    assert not any("BodyPartExamined" in w for w in res[0].warnings)
    assert any("BodyPartExamined is RIBCAGE" in w and "udacity_test4.dcm" in w for w in res[1].warnings)
