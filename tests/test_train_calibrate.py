"""Issue 17 training side: temperature fit, ECE, the sensitive operating point, generated
non-radiographs, the source-cue augmentations, the deadline and the CPU bf16 switch."""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("torch", reason="train/ needs the workbench (torch)")

from cxr_edge.train import calibrate as cal  # noqa: E402
from cxr_edge.train.augment import Augment  # noqa: E402


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_fit_temperature_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(z)])   # labels drawn from softmax(z)
    # logits 3x too confident: the fitted temperature undoes that
    t = cal.fit_temperature(3 * z, y)
    assert 2.6 < t < 3.4
    assert cal.nll(3 * z, y, t) < cal.nll(3 * z, y)


def test_ece_zero_when_confidence_matches_accuracy_and_large_when_not():
    probs = np.array([[0.9, 0.05, 0.05]] * 10)
    labels = np.array([0] * 9 + [1])
    assert cal.ece(probs, labels) == pytest.approx(0.0, abs=1e-9)
    assert cal.ece(probs, np.ones(10, int)) == pytest.approx(0.9)


def test_operating_point_rule_and_choice():
    probs = np.array([[0.1, 0.6, 0.3], [0.2, 0.7, 0.1], [0.05, 0.9, 0.05], [0.5, 0.2, 0.3]])
    labels = np.array([2, 0, 1, 0])     # normal index 1
    pred = cal.operating_point_predict(probs, 1, 0.65)
    assert pred.tolist() == [2, 1, 1, 0]         # p(normal) 0.6 < 0.65 -> the larger disease (2)
    t = cal.choose_operating_point(probs, labels, 1, target=1.0)
    assert t == pytest.approx(0.705)              # smallest grid t with every disease image called disease
    assert (cal.operating_point_predict(probs, 1, t)[labels != 1] != 1).all()


def test_synthetic_images_are_deterministic_images():
    for k in cal.SYNTH_KINDS:
        a, b = cal.synthetic_image(k, 5), cal.synthetic_image(k, 5)
        assert a.shape == (256, 256) and a.dtype == np.float32
        assert 0.0 <= a.min() and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        cal.synthetic_image("cat", 0)


def test_source_cue_augmentations():
    x = np.full((96, 96), 0.5, np.float32)
    a = Augment(erase_border=1.0, seed=3)
    changed = np.zeros_like(x, bool)
    for _ in range(40):
        y = a(x)
        assert y.shape == x.shape and y.dtype == np.float32 and 0 <= y.min() and y.max() <= 1
        changed |= y != x
    # erasing touches the borders and corners only: the centre is never erased
    assert changed[0, 0] or changed[0, -1] or changed[-1, 0] or changed[-1, -1]
    assert not changed[40:56, 40:56].any()
    full = dict(rotation=8, zoom=0.08, translate=0.05, brightness=0.08, contrast=0.2, crop=0.3, crop_aspect=0.15,
                gamma=0.35, equalize=0.5, erase_border=0.5, markers=1.0, lowres=0.5, noise=0.02)
    img = np.random.default_rng(1).uniform(0, 1, (80, 80)).astype(np.float32)
    r1 = [Augment(**full, seed=7)(img) for _ in range(2)]
    r2 = [Augment(**full, seed=7)(img) for _ in range(2)]
    np.testing.assert_array_equal(r1[0], r2[0])    # seeded: reproducible
    assert not np.array_equal(r1[0], img)
    assert Augment.from_dict({}) is None


def test_deadline_and_cpu_bf16_switch():
    from cxr_edge.train.loop import _past_deadline, _want_cpu_bf16, cpu_bf16_support
    assert not _past_deadline(None, 10)
    assert _past_deadline(time.time() + 5, 10)
    assert not _past_deadline(time.time() + 100, 10)
    assert _past_deadline("2000-01-01T00:00", 0)
    native, why = cpu_bf16_support()
    assert isinstance(native, bool) and why
    assert _want_cpu_bf16("auto") == native
    assert _want_cpu_bf16(False) is False
    with pytest.raises(ValueError, match="cpu_bf16"):
        _want_cpu_bf16("yes")


def test_fit_and_apply_write_the_package_keys_and_card(tmp_path):
    """fit() on a collect-shaped file (generated logits/features), then apply() to a copy of the
    default package: model.json keys, their checksummed round trip, and the card sections."""
    import shutil
    from cxr_edge.package import DEFAULT_PACKAGE, ModelPackage, PackageError, sha256_file
    if not (DEFAULT_PACKAGE / "model.json").is_file():
        pytest.skip("the default model package has not been built into this checkout yet")
    rng = np.random.default_rng(0)
    arr = {"classes": np.array(["covid", "normal", "pneumonia"]), "normal_class": np.array("normal"),
           "checkpoint": np.array("generated")}
    for part, n in (("val", 300), ("test", 300), ("lateral", 20), ("synthetic", 24)):
        y = rng.integers(0, 3, n) if part in ("val", "test") else np.full(n, -1)
        z = rng.normal(0, 1, (n, 3))
        if part in ("val", "test"):
            z[np.arange(n), y] += 3.0
        arr[f"{part}_logits"], arr[f"{part}_labels"] = 2.0 * z, y
        arr[f"{part}_features"] = rng.normal(0, 1, (n, 8)) + (0 if part in ("val", "test") else 3)
        arr[f"{part}_sources"] = np.array(["a", "b"] * (n // 2)) if part != "synthetic" else \
            np.array([cal.SYNTH_KINDS[i % 12] for i in range(n)])
        arr[f"{part}_paths"] = np.array([f"{part}{i}" for i in range(n)])
    np.savez(tmp_path / "c.npz", **arr)
    frag = cal.fit(tmp_path / "c.npz", guard_file=tmp_path / "frag.input_guard.f32")
    n = frag["calibration"]["nll"]
    assert frag["calibration"]["temperature"] != 1.0 and n["val_after"] <= n["val_before"]
    op = frag["operating_points"]["sensitive"]
    assert op["val"]["sensitivity"] >= 0.95 and 0.5 <= op["normal_min_probability"] <= 0.995
    g = frag["input_guard"]
    assert "warn_above" not in g and g["mahalanobis"]["channels"] == 8 and g["mahalanobis"]["classes"] == 3
    r = g["rates"]
    assert 0 < r["false_alarm_val_frontal"] <= 0.05 and r["false_alarm_test_frontal"] <= 0.1
    assert r["miss_lateral"] == 0.0 and r["miss_synthetic"] == 0.0          # shifted by 3 sd in 8 dimensions
    assert set(r["miss_synthetic_by_kind"]) == set(cal.SYNTH_KINDS)
    assert frag["files"] == {"input_guard.f32": "frag.input_guard.f32"}
    import json
    (tmp_path / "frag.json").write_text(json.dumps(frag))
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, pkg_dir)                    # copies: never write into the shipped files
    cal.apply(pkg_dir, tmp_path / "frag.json")
    pkg = ModelPackage.read(pkg_dir)                              # checksums still verify, the guard file's too
    # the shipped int8 guard was fitted with the replaced fp32 guard: removed with it (fit_precision again)
    assert "by_precision" not in pkg.input_guard and not (pkg_dir / "input_guard.int8.f32").exists()
    assert pkg.calibration["temperature"] == frag["calibration"]["temperature"]
    rec = pkg.input_guard["mahalanobis"]
    assert rec["sha256"] == sha256_file(pkg_dir / "input_guard.f32") == g["mahalanobis"]["sha256"]
    assert "report" not in json.loads((pkg_dir / "model.json").read_text())
    assert "files" not in json.loads((pkg_dir / "model.json").read_text())
    card = (pkg_dir / "MODEL_CARD.md").read_text()
    for heading in ("## Calibration", "## Operating point `sensitive`", "## Input guard"):
        assert heading in card
    assert "Mahalanobis" in card and "Lee et al." in card
    # these 8-channel parameters do not fit the model's 1024-channel feature map: refused at load
    import cxr_edge
    with pytest.raises(PackageError, match="needs a 'features' output of 8 channels"):
        cxr_edge.load(pkg_dir, backend="onnxruntime", precision="fp32")
    # re-runnable: a new fit replaces the file and its checksum
    arr["val_features"] = arr["val_features"] * 1.5
    np.savez(tmp_path / "c2.npz", **arr)
    frag2 = cal.fit(tmp_path / "c2.npz", guard_file=tmp_path / "frag2.input_guard.f32")
    (tmp_path / "frag2.json").write_text(json.dumps(frag2))
    cal.apply(pkg_dir, tmp_path / "frag2.json")
    again = ModelPackage.read(pkg_dir)
    assert again.input_guard["mahalanobis"]["sha256"] == frag2["input_guard"]["mahalanobis"]["sha256"] != rec["sha256"]
    # a parameter file that is not the one the fragment was fitted with is refused
    (tmp_path / "frag2.input_guard.f32").write_bytes((tmp_path / "frag.input_guard.f32").read_bytes())
    with pytest.raises(ValueError, match="not the parameter file this fragment was fitted with"):
        cal.apply(pkg_dir, tmp_path / "frag2.json")
    # a fragment whose guard has no parameter file removes the old one (unlisted, it would be refused)
    (tmp_path / "energy.json").write_text(json.dumps({"input_guard": {"warn_below": 1.0, "warn_above": 6.0}}))
    cal.apply(pkg_dir, tmp_path / "energy.json")
    assert not (pkg_dir / "input_guard.f32").exists()
    assert ModelPackage.read(pkg_dir).input_guard == {"warn_below": 1.0, "warn_above": 6.0}


def test_guard_threshold_comes_from_out_of_fold_scores():
    """Scored by parameters fitted on themselves, 150 images in 100 dimensions look far closer
    than new ones: their 2 % quantile would warn on almost every new image. The out-of-fold
    threshold keeps new images' false alarms low."""
    from cxr_edge.guard import GapMahalanobis
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.3, 2, 100)

    def draw(n):
        y = np.arange(n) % 3
        return rng.normal(0, 1, (n, 100)) * scale + 2 * np.eye(3, 100)[y], y
    fv, yv = draw(150)
    fresh, _ = draw(3000)
    folds = cal.stratified_folds(yv)
    assert all((np.bincount(folds[yv == k]) == 10).all() for k in range(3))   # each class spread evenly
    g = GapMahalanobis.fit(fv, yv, 3)
    in_sample = np.quantile(g.score(fv), 0.02)
    out_of_fold = np.quantile(cal.out_of_fold_scores(fv, yv, 3), 0.02)
    assert np.mean(g.score(fresh) < in_sample) > 0.5
    assert np.mean(g.score(fresh) < out_of_fold) <= 0.05


def test_fit_precision_writes_an_int8_guard_fitted_on_int8_features(tmp_path):
    """fit_precision on real X-rays (a small split) and a copy of the default package: the int8
    guard's file is listed and checksummed, an int8 run uses it, and the fp32 threshold recomputed
    from the runtime's fp32 features is a finite number of the same kind."""
    import dataclasses
    import json
    import shutil

    import cxr_edge
    from conftest import CXR, shared_images
    from cxr_edge.package import DEFAULT_PACKAGE, ModelPackage
    picked = shared_images(60, seed=4)
    split = {"val": [dataclasses.asdict(s) for s in picked[:45]], "test": [dataclasses.asdict(s) for s in picked[45:]]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, pkg_dir)
    guard = ModelPackage.read(pkg_dir).input_guard
    guard.pop("by_precision", None)
    (pkg_dir / "input_guard.int8.f32").unlink(missing_ok=True)
    meta = json.loads((pkg_dir / "model.json").read_text())
    meta["input_guard"] = guard
    (pkg_dir / "model.json").write_text(json.dumps(meta))
    entry = cal.fit_precision(pkg_dir, tmp_path / "split.json", CXR, "int8", "onnxruntime", log=lambda *a: None)
    pkg = ModelPackage.read(pkg_dir)                                   # verifies the new file's checksum
    assert pkg.input_guard["by_precision"]["int8"] == entry
    assert entry["mahalanobis"]["file"] == "input_guard.int8.f32" and entry["mahalanobis"]["channels"] == 1024
    assert np.isfinite(entry["warn_below"]) and np.isfinite(entry["fp32_warn_below_recomputed"])
    assert entry["rates"]["n_val"] == 45 and entry["rates"]["n_test"] == 15 and entry["rates"]["n_synthetic"] == 120
    assert 0 < entry["rates"]["false_alarm_val_frontal"] <= 0.05                 # one of 45 at the 2 % quantile
    clf = cxr_edge.load(pkg_dir, backend="onnxruntime", precision="int8")
    assert clf.guard.warn_below == entry["warn_below"]
    assert "Run at int8" in (pkg_dir / "MODEL_CARD.md").read_text()


def test_fit_precision_refuses_fp32_and_a_package_without_guard(tmp_path):
    """fp32 features have the package's own guard; a package without a Mahalanobis guard has none to
    go with. Both are refused before any model is loaded."""
    import json
    import shutil

    from cxr_edge.package import DEFAULT_PACKAGE
    with pytest.raises(ValueError, match="fp32 features have the package's own guard"):
        cal.fit_precision(DEFAULT_PACKAGE, tmp_path / "split.json", tmp_path, "fp32")
    with pytest.raises(ValueError, match="not a reduced run precision"):   # it would name the parameter file
        cal.fit_precision(DEFAULT_PACKAGE, tmp_path / "split.json", tmp_path, "../int8")
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, pkg_dir)
    meta = json.loads((pkg_dir / "model.json").read_text())
    meta["input_guard"] = {"warn_below": 1.0, "warn_above": 6.0}
    for f in pkg_dir.glob("input_guard*.f32"):
        f.unlink()
    (pkg_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="no Mahalanobis input guard"):
        cal.fit_precision(pkg_dir, tmp_path / "split.json", tmp_path, "int8")
