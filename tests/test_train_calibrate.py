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
    from cxr_edge.package import DEFAULT_PACKAGE, ModelPackage
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
    frag = cal.fit(tmp_path / "c.npz")
    n = frag["calibration"]["nll"]
    assert frag["calibration"]["temperature"] != 1.0 and n["val_after"] <= n["val_before"]
    op = frag["operating_points"]["sensitive"]
    assert op["val"]["sensitivity"] >= 0.95 and 0.5 <= op["normal_min_probability"] <= 0.995
    g = frag["input_guard"]
    assert g["warn_below"] < g["warn_above"] and 0 <= g["rates"]["false_alarm_test_frontal"] <= 0.2
    import json
    (tmp_path / "frag.json").write_text(json.dumps(frag))
    pkg_dir = tmp_path / "pkg"
    shutil.copytree(DEFAULT_PACKAGE, pkg_dir)
    cal.apply(pkg_dir, tmp_path / "frag.json")
    pkg = ModelPackage.read(pkg_dir)                              # checksums still verify
    assert pkg.calibration["temperature"] == frag["calibration"]["temperature"]
    assert "report" not in json.loads((pkg_dir / "model.json").read_text())
    card = (pkg_dir / "MODEL_CARD.md").read_text()
    for heading in ("## Calibration", "## Operating point `sensitive`", "## Input guard"):
        assert heading in card
