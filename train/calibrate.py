"""Calibration, operating point and input-guard thresholds for a trained model (issue 17).

    # 1. logits + GAP features of the val/test split, the data set's lateral views and generated
    #    non-radiographs (one forward pass each; minutes on a CPU)
    python -m cxr_edge.train.calibrate collect --checkpoint RUN/best.safetensors \
        --split RUN/split.json --data ../shared/data/cxr --out RUN/calib.npz
    # 2. temperature, ECE, sensitive operating point, input guard -> a model.json fragment + report,
    #    and the guard's parameters next to it (RUN/calibration.input_guard.f32)
    python -m cxr_edge.train.calibrate fit RUN/calib.npz --out RUN/calibration.json
    # 3. after export: write the fragment into a package's model.json (keys calibration,
    #    operating_points, input_guard), copy the parameter file in as input_guard.f32; checksums
    #    are re-stamped by ModelPackage.write. Re-running replaces both.
    python -m cxr_edge.train.calibrate apply PACKAGE RUN/calibration.json
    # 4. for each reduced precision the package ships (its int8 artifact's features differ): a
    #    guard fitted on that precision's own features through the runtime (after every apply)
    python -m cxr_edge.train.calibrate precision PACKAGE --split RUN/split.json \
        --data ../shared/data/cxr --precision int8

Rules (also in docs/REPRODUCTION.md and the runtime, cxr_edge/guard.py):
- temperature T: one scalar minimising the validation NLL of softmax(logits / T); the runtime
  reports softmax(logits / T). Argmax labels are unchanged by T.
- operating point "sensitive": call an image normal only when the calibrated p(normal) >= t,
  otherwise the most probable disease class; t is the smallest value on a grid whose validation
  disease sensitivity (any disease not called normal) reaches the target (default 0.95).
- input guard: score = minus the smallest class-conditional Mahalanobis distance of the
  global-average-pooled feature map (Lee et al., NeurIPS 2018): class means and one covariance
  of the class-centred features, shrunk by GUARD_SHRINKAGE towards its mean variance, fitted on
  the validation frontal radiographs. Below the threshold the result carries a warning. The
  threshold is the 2 % quantile of the validation images' *out-of-fold* scores (5 folds):
  in-sample scores of 428 images in 1024 dimensions are far too close. False-alarm rates are
  measured on validation (out of fold) and test frontals, miss rates on the lateral views and on
  generated non-radiographs, all with the float32 parameters as shipped. The energy score
  logsumexp(logits / T) of earlier packages (two-sided, 2 % / 99 %) is only reported for
  comparison: on v1 it added catches only by adding false alarms, and at the same validation
  false-alarm rate the Mahalanobis score alone catches more (report "input_guard_comparison").
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr_edge.guard import CHEST_BODY_PARTS, GUARD_FILE, LATERAL_VIEWS, GapMahalanobis  # noqa: E402 (one list, runtime and fit)

SYNTH_KINDS = ("uniform_noise", "gaussian_noise", "cloud_noise", "linear_gradient", "radial_gradient",
               "text_page", "stripes", "checkerboard", "shapes", "blank", "blobs_photo", "dark_text")


# -- generated non-radiographs ----------------------------------------------------------------------
def synthetic_image(kind: str, seed: int, size: int = 256) -> np.ndarray:
    """A deterministic (size, size) float32 0..1 image that is not a chest radiograph."""
    from PIL import Image, ImageDraw, ImageFilter
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "uniform_noise":
        x = r.uniform(0, 1, (size, size))
    elif kind == "gaussian_noise":
        x = np.clip(r.normal(r.uniform(0.3, 0.7), r.uniform(0.05, 0.3), (size, size)), 0, 1)
    elif kind == "cloud_noise":   # 1/f^beta noise: natural-texture statistics
        f = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
        f[0, 0] = 1
        spec = (r.normal(size=(size, size)) + 1j * r.normal(size=(size, size))) / f ** (r.uniform(0.8, 1.6) / 2)
        x = np.real(np.fft.ifft2(spec))
        x = (x - x.min()) / (np.ptp(x) + 1e-9)
    elif kind == "linear_gradient":
        a = r.uniform(0, 2 * math.pi)
        x = np.cos(a) * xx + np.sin(a) * yy
        x = (x - x.min()) / (np.ptp(x) + 1e-9)
    elif kind == "radial_gradient":
        cx, cy = r.uniform(0.2, 0.8, 2)
        x = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        x = 1 - x / x.max() if r.random() < 0.5 else x / x.max()
    elif kind in ("text_page", "dark_text"):
        bg, fg = (1.0, 0.0) if kind == "text_page" else (0.0, 1.0)
        img = Image.new("F", (size, size), bg)
        d = ImageDraw.Draw(img)
        words = ["patient", "report", "chest", "normal", "lorem", "ipsum", "2026", "findings", "dose", "mAs"]
        y = 4
        while y < size - 10:
            d.text((4, y), " ".join(r.choice(words, int(r.integers(3, 9)))), fill=fg)
            y += int(r.integers(10, 16))
        x = np.asarray(img)
    elif kind == "stripes":
        per = r.uniform(4, 40)
        x = 0.5 + 0.5 * np.sin(2 * math.pi * (xx if r.random() < 0.5 else yy) * size / per)
    elif kind == "checkerboard":
        n = int(r.integers(2, 16))
        x = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    elif kind == "shapes":
        img = Image.new("L", (size, size), int(r.integers(0, 256)))
        d = ImageDraw.Draw(img)
        for _ in range(int(r.integers(3, 12))):
            box = sorted(r.uniform(0, size, 2)), sorted(r.uniform(0, size, 2))
            b = [box[0][0], box[1][0], box[0][1], box[1][1]]
            (d.ellipse if r.random() < 0.5 else d.rectangle)(b, fill=int(r.integers(0, 256)))
        x = np.asarray(img.filter(ImageFilter.GaussianBlur(float(r.uniform(0, 3)))), np.float32) / 255.0
    elif kind == "blank":
        x = np.full((size, size), float(r.choice([0.0, 0.5, 1.0, r.uniform(0, 1)])))
    elif kind == "blobs_photo":   # smooth blobs + texture: a gray "photograph"
        x = np.zeros((size, size), np.float32)
        for _ in range(int(r.integers(4, 12))):
            cx, cy, s = r.uniform(0, 1), r.uniform(0, 1), r.uniform(0.05, 0.3)
            x += r.uniform(-1, 1) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        x += 0.05 * r.normal(size=(size, size))
        x = (x - x.min()) / (np.ptp(x) + 1e-9)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {SYNTH_KINDS}")
    return np.clip(np.asarray(x, np.float32), 0, 1)


def synthetic_set(per_kind: int = 10, seed: int = 1234) -> list[tuple[str, np.ndarray]]:
    return [(k, synthetic_image(k, seed + 1000 * i + j)) for i, k in enumerate(SYNTH_KINDS) for j in range(per_kind)]


# -- forward passes ----------------------------------------------------------------------------------
def _forward(net, arrays, spec, batch: int = 16):
    """arrays: resampled (size, size) 0..1 images -> (logits (N, K) float32, GAP features (N, C) float32)."""
    import torch
    from cxr_edge.preprocess import normalise
    logits, feats = [], []
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(arrays), batch):
            x = torch.from_numpy(np.stack([normalise(a.astype(np.float32), spec) for a in arrays[i:i + batch]]))
            lo, f = net.forward_with_features(x)
            logits.append(lo.float().numpy())
            feats.append(f.float().mean((2, 3)).numpy())
    return np.concatenate(logits), np.concatenate(feats)


def collect(checkpoint, split_json, data_dir, out, per_kind: int = 10, log=print) -> Path:
    """Write OUT (.npz): for parts val, test, lateral, synthetic — logits, GAP features, labels
    (class index, -1 for lateral/synthetic), sources/kinds, paths."""
    import torch
    from cxr_edge.decode import decode
    from cxr_edge.preprocess import PreprocessSpec, resample

    from .checkpoint import load_checkpoint
    from .experiment import read_split
    torch.set_num_threads(2)
    net, meta = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    classes = meta["classes"]
    load = lambda p: resample(decode(p, min_side=spec.decode_hint()).pixels, spec)
    parts = {}
    for part in ("val", "test"):
        ss = read_split(split_json, part)
        with ThreadPoolExecutor(2) as ex:
            arrays = list(ex.map(load, [s.path for s in ss]))
        lo, f = _forward(net, arrays, spec)
        parts[part] = (lo, f, np.array([classes.index(s.label) for s in ss]), [s.source for s in ss],
                       [s.path for s in ss])
        log(f"{part}: {len(ss)} images")
    root = Path(data_dir)
    with open(root / "manifest.csv", newline="") as fh:
        lat = [r for r in csv.DictReader(fh) if r.get("view") == "L"]
    arrays = [load(str(root / r["path"])) for r in lat]
    lo, f = _forward(net, arrays, spec)
    parts["lateral"] = (lo, f, np.full(len(lat), -1), [r["source"] for r in lat], [r["path"] for r in lat])
    log(f"lateral: {len(lat)} images")
    syn = synthetic_set(per_kind)
    lo, f = _forward(net, [resample(a, spec) for _, a in syn], spec)
    parts["synthetic"] = (lo, f, np.full(len(syn), -1), [k for k, _ in syn], [f"synthetic:{k}" for k, _ in syn])
    log(f"synthetic: {len(syn)} images")
    arrs = {}
    for part, (lo, f, y, src, paths) in parts.items():
        arrs[f"{part}_logits"], arrs[f"{part}_features"], arrs[f"{part}_labels"] = lo, f, y
        arrs[f"{part}_sources"], arrs[f"{part}_paths"] = np.array(src), np.array(paths)
    arrs["classes"] = np.array(classes)
    arrs["normal_class"] = np.array(meta.get("normal_class") or "")
    arrs["checkpoint"] = np.array(str(checkpoint))
    out = Path(out)
    np.savez_compressed(out, **arrs)
    return out



# -- fitting -----------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


def nll(logits: np.ndarray, labels: np.ndarray, t: float = 1.0) -> float:
    z = logits / t
    return float(np.mean(_logsumexp(z) - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the NLL of softmax(logits / T) (log grid, then a finer grid)."""
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 400))
    best = grid[int(np.argmin([nll(logits, labels, t) for t in grid]))]
    fine = np.exp(np.linspace(np.log(best) - 0.02, np.log(best) + 0.02, 81))
    return float(fine[int(np.argmin([nll(logits, labels, t) for t in fine]))])


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 confidence, equal-width bins on (0, 1]."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    out = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            out += m.mean() * abs(float((pred[m] == labels[m]).mean()) - float(conf[m].mean()))
    return float(out)


def operating_point_predict(probs: np.ndarray, normal_index: int, normal_min: float) -> np.ndarray:
    """The "sensitive" rule: normal only when p(normal) >= normal_min, else the most probable
    disease class. probs (N, K) -> (N,) int predictions."""
    masked = probs.copy()
    masked[:, normal_index] = -1.0
    disease = masked.argmax(1)
    return np.where(probs[:, normal_index] >= normal_min, normal_index, disease)


def _binary(pred: np.ndarray, labels: np.ndarray, normal_index: int, classes) -> dict:
    dis = labels != normal_index
    called = pred != normal_index
    out = {"n": int(len(labels)),
           "sensitivity": float(called[dis].mean()) if dis.any() else None,
           "specificity": float((~called[~dis]).mean()) if (~dis).any() else None,
           "accuracy": float((pred == labels).mean()) if len(labels) else None}
    for i, c in enumerate(classes):
        if i != normal_index:
            m = labels == i
            out[f"{c}_called_normal"] = int((pred[m] == normal_index).sum())
            out[f"{c}_n"] = int(m.sum())
    return out


def choose_operating_point(probs, labels, normal_index: int, target: float = 0.95) -> float:
    """Smallest t on a 0.005 grid in [0.5, 0.995] whose disease sensitivity reaches `target`
    (0.995 when none does)."""
    for t in np.round(np.arange(0.5, 0.9951, 0.005), 3):
        pred = operating_point_predict(probs, normal_index, float(t))
        dis = labels != normal_index
        if (pred[dis] != normal_index).mean() >= target:
            return float(t)
    return 0.995


def _auroc(id_score: np.ndarray, ood_score: np.ndarray) -> float | None:
    """AUROC of telling in-distribution (higher score) from OOD; None when a side is empty."""
    if not len(id_score) or not len(ood_score):
        return None
    from .metrics import roc_auc_binary
    return roc_auc_binary(np.r_[np.ones(len(id_score)), np.zeros(len(ood_score))], np.r_[id_score, ood_score])


GUARD_SHRINKAGE = 0.1   # 428 validation images cannot estimate a 1024 x 1024 covariance on their own
GUARD_FOLDS = 5


def stratified_folds(labels: np.ndarray, folds: int = GUARD_FOLDS, seed: int = 0) -> np.ndarray:
    """(N,) fold index 0..folds-1 for each image: every class spread evenly over the folds
    (seeded permutation within each class, then round robin)."""
    y = np.asarray(labels)
    out = np.empty(len(y), int)
    rng = np.random.default_rng(seed)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        out[idx] = np.arange(len(idx)) % folds
    return out


def out_of_fold_scores(features: np.ndarray, labels: np.ndarray, k: int, folds: int = GUARD_FOLDS,
                       shrinkage: float = GUARD_SHRINKAGE, scored: np.ndarray | None = None) -> np.ndarray:
    """(N,) Mahalanobis score of each image from parameters fitted without its fold. A threshold
    must come from these: scored by parameters fitted on themselves, 428 images in 1024
    dimensions look far closer than new radiographs do (the 2 % in-sample quantile of v1's
    validation split gave 23 % false alarms on the test split). `scored`: (N, C) features of the
    same images to score instead of `features` (another run precision's), the parameters still
    fitted on `features` as the shipped ones are."""
    fold = stratified_folds(labels, folds)
    scored = features if scored is None else scored
    out = np.empty(len(labels))
    for f in range(folds):
        held = fold == f
        out[held] = GapMahalanobis.fit(features[~held], labels[~held], k, shrinkage).score(scored[held])
    return out


def _shipped(params: GapMahalanobis) -> GapMahalanobis:
    """The parameters as the runtime reads them back from the float32 file: rates are measured on these."""
    return GapMahalanobis.from_bytes(params.to_bytes(), len(params.means), params.channels, params.rank,
                                     params.isotropic_precision)


def fit_input_guard(d, id_quantile: float = 0.02, shrinkage: float = GUARD_SHRINKAGE):
    """The Mahalanobis input guard from a `collect` file's arrays `d`: parameters fitted on every
    validation image, threshold = the `id_quantile` quantile of the validation images'
    out-of-fold scores. Returns (parameters as shipped (float32), model.json "input_guard" without
    the file's checksum, {part: (N,) scores} with "val" out of fold)."""
    yv = d["val_labels"]
    k = len(d["classes"])
    params = _shipped(GapMahalanobis.fit(d["val_features"], yv, k, shrinkage))
    scores = {"val": out_of_fold_scores(d["val_features"], yv, k, shrinkage=shrinkage),
              **{part: params.score(d[f"{part}_features"]) for part in ("test", "lateral", "synthetic")}}
    thr = round(float(np.quantile(scores["val"], id_quantile)), 4)   # as model.json stores it
    guard = {"score": "minus the smallest class-conditional Mahalanobis distance of the global-average-pooled "
                      "feature map (shared covariance, shrunk; Lee et al., NeurIPS 2018)",
             "warn_below": thr,
             "calibrated_on": f"the {id_quantile:.0%} quantile of the score on {len(yv)} validation frontal "
                              f"radiographs, each scored out of fold ({GUARD_FOLDS} folds); class means and "
                              f"covariance (shrinkage {shrinkage}) fitted on all of them",
             "rates": guard_rates(scores, lambda s: s < thr, [str(x) for x in d["synthetic_sources"]]),
             "mahalanobis": params.record()}
    return params, guard, scores


def guard_rates(scores: dict, warn, kinds: list) -> dict:
    """False-alarm and miss rates of a warning rule `warn` ((N,) scores -> (N,) bool) on the
    collect parts; the synthetic misses also by kind."""
    k = np.array(kinds)
    miss = lambda part, m=slice(None): round(float((~warn(scores[part][m])).mean()), 4)   # noqa: E731
    return {"false_alarm_val_frontal": round(float(warn(scores["val"]).mean()), 4), "n_val": len(scores["val"]),
            "false_alarm_test_frontal": round(float(warn(scores["test"]).mean()), 4), "n_test": len(scores["test"]),
            "miss_lateral": miss("lateral"), "n_lateral": len(scores["lateral"]),
            "miss_synthetic": miss("synthetic"), "n_synthetic": len(scores["synthetic"]),
            "miss_synthetic_by_kind": {kind: miss("synthetic", k == kind) for kind in sorted(set(kinds))}}


def fit(npz, target_sensitivity: float = 0.95, id_quantile: float = 0.02, id_quantile_high: float = 0.99,
        temperature: float | None = None, guard_file=None) -> dict:
    """Fit temperature, the sensitive operating point and the input guard from a `collect` file;
    returns the model.json fragment plus a "report" (not for model.json). guard_file: where to
    write the guard's parameter file (GUARD_LAYOUT); `apply` looks for it next to the fragment,
    under the name recorded in the fragment's "files". id_quantile_high: the energy score's upper
    threshold, reported for comparison only."""
    from .metrics import classification_report
    d = np.load(npz, allow_pickle=False)
    classes = [str(c) for c in d["classes"]]
    normal = str(d["normal_class"])
    ni = classes.index(normal)
    Lv, yv, Lt, yt = d["val_logits"], d["val_labels"], d["test_logits"], d["test_labels"]
    T = fit_temperature(Lv, yv) if temperature is None else float(temperature)   # a given T: thresholds for it
    pv0, pv, pt0, pt = _softmax(Lv), _softmax(Lv / T), _softmax(Lt), _softmax(Lt / T)
    calib = {"method": "temperature", "temperature": round(T, 4),
             "fitted_on": f"validation split ({len(yv)} images), minimum NLL" if temperature is None else
                          f"fixed (given); fitted value on the validation split: {fit_temperature(Lv, yv):.4f}",
             "ece_15_bins": {"val_before": round(ece(pv0, yv), 4), "val_after": round(ece(pv, yv), 4),
                             "test_before": round(ece(pt0, yt), 4), "test_after": round(ece(pt, yt), 4)},
             "nll": {"val_before": round(nll(Lv, yv), 4), "val_after": round(nll(Lv, yv, T), 4),
                     "test_before": round(nll(Lt, yt), 4), "test_after": round(nll(Lt, yt, T), 4)}}
    t = choose_operating_point(pv, yv, ni, target_sensitivity)
    op = {"rule": f"label {normal} only when the calibrated p({normal}) >= normal_min_probability, "
                  "otherwise the most probable disease class",
          "normal_min_probability": t, "target_sensitivity": target_sensitivity,
          "chosen_on": "validation split",
          "val": _binary(operating_point_predict(pv, ni, t), yv, ni, classes),
          "test": _binary(operating_point_predict(pt, ni, t), yt, ni, classes),
          "test_default_argmax": _binary(pt.argmax(1), yt, ni, classes)}
    # input guard: the Mahalanobis score on pooled features (the energy score is kept for comparison)
    params, guard, maha = fit_input_guard(d, id_quantile)
    guard["dicom"] = {"body_part_ok": list(CHEST_BODY_PARTS), "lateral_views": list(LATERAL_VIEWS)}
    raw = params.to_bytes()
    guard["mahalanobis"].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    kinds = [str(k) for k in d["synthetic_sources"]]
    energy = {"val": _logsumexp(Lv / T), "test": _logsumexp(Lt / T), "lateral": _logsumexp(d["lateral_logits"] / T),
              "synthetic": _logsumexp(d["synthetic_logits"] / T)}
    sv, st, sl, ss = (energy[p] for p in ("val", "test", "lateral", "synthetic"))
    lo, hi = float(np.quantile(sv, id_quantile)), float(np.quantile(sv, id_quantile_high))
    maha_warn = lambda s: s < guard["warn_below"]   # noqa: E731
    energy_warn = {p: (e < lo) | (e > hi) for p, e in energy.items()}
    both = guard_rates({p: np.c_[maha[p], energy_warn[p]] for p in maha},
                       lambda x: maha_warn(x[:, 0]) | (x[:, 1] > 0), kinds)
    # the fair question for the energy check: does it catch more than the Mahalanobis score alone
    # would at the same validation false-alarm rate?
    same_budget = float(np.quantile(maha["val"], both["false_alarm_val_frontal"]))
    comparison = {"energy_two_sided": {"warn_below": round(lo, 4), "warn_above": round(hi, 4),
                                       **guard_rates(energy, lambda e: (e < lo) | (e > hi), kinds)},
                  "mahalanobis_or_energy": both,
                  "mahalanobis_at_the_same_val_false_alarm": guard_rates(maha, lambda s: s < same_budget, kinds),
                  "mahalanobis_by_quantile": {}}
    for q in (0.01, 0.02, 0.05, 0.1):   # the trade-off a different --id-quantile would give
        t = float(np.quantile(maha["val"], q))
        comparison["mahalanobis_by_quantile"][str(q)] = guard_rates(maha, lambda s, t=t: s < t, kinds)
    auroc = {"energy_test_vs_lateral": _auroc(st, sl), "energy_test_vs_synthetic": _auroc(st, ss),
             "msp_test_vs_lateral": _auroc(pt.max(1), _softmax(d["lateral_logits"] / T).max(1)),
             "msp_test_vs_synthetic": _auroc(pt.max(1), _softmax(d["synthetic_logits"] / T).max(1)),
             "mahalanobis_gap_test_vs_lateral": _auroc(maha["test"], maha["lateral"]),
             "mahalanobis_gap_test_vs_synthetic": _auroc(maha["test"], maha["synthetic"])}
    # test metrics with calibrated probabilities (argmax unchanged), per source
    rep = classification_report(yt, pt, classes, normal)
    srcs = np.array([str(x) for x in d["test_sources"]])
    by_source = {s: classification_report(yt[srcs == s], pt[srcs == s], classes, normal) for s in sorted(set(srcs))}
    report = {"checkpoint": str(d["checkpoint"]), "test": rep, "test_by_source": by_source,
              "val": classification_report(yv, pv, classes, normal), "ood_auroc": auroc,
              "ood_scores": {"energy_val_q01_q05_q50": np.quantile(sv, [0.01, 0.05, 0.5]).round(3).tolist(),
                             "energy_lateral_q50_q95": np.quantile(sl, [0.5, 0.95]).round(3).tolist(),
                             "energy_synthetic_q50_q95": np.quantile(ss, [0.5, 0.95]).round(3).tolist(),
                             "mahalanobis_val_out_of_fold_q01_q02_q05_q50":
                                 np.quantile(maha["val"], [0.01, 0.02, 0.05, 0.5]).round(1).tolist(),
                             "mahalanobis_test_q02_q50": np.quantile(maha["test"], [0.02, 0.5]).round(1).tolist(),
                             "mahalanobis_lateral_q05_q50_q95": np.quantile(maha["lateral"], [0.05, 0.5, 0.95]).round(1).tolist(),
                             "mahalanobis_synthetic_q50_q95": np.quantile(maha["synthetic"], [0.5, 0.95]).round(1).tolist()},
              "input_guard_comparison": comparison}
    frag = {"calibration": calib, "operating_points": {"sensitive": op}, "input_guard": guard, "report": report}
    if guard_file is not None:   # apply() finds it next to the fragment, by this name
        Path(guard_file).write_bytes(raw)
        frag["files"] = {guard["mahalanobis"]["file"]: Path(guard_file).name}
    return frag


def runtime_features(clf, items, batch: int = 8) -> np.ndarray:
    """(N, C) float64 pooled feature maps of `items` (paths, or float 0..1 arrays) through a loaded
    classifier's decode, the package's preprocessing and its backend: what its input guard scores."""
    from cxr_edge.decode import decode
    from cxr_edge.guard import pool_features
    from cxr_edge.preprocess import preprocess

    def prepare(item):
        return preprocess(decode(item, min_side=clf.spec.decode_hint()).pixels, clf.spec)
    out = []
    with ThreadPoolExecutor(2) as ex:
        for i in range(0, len(items), batch):
            x = np.stack(list(ex.map(prepare, items[i:i + batch])))
            out.append(pool_features(clf.backend.infer(x, features=True)["features"]))
    return np.concatenate(out)


def fit_precision(package_dir, split_json, data_dir, precision: str = "int8", backend: str = "openvino",
                  id_quantile: float = 0.02, log=print) -> dict:
    """The input guard for a reduced run precision, fitted on that precision's own features and
    written into PACKAGE: parameter file input_guard.<precision>.f32 and model.json
    input_guard.by_precision[precision] = {warn_below, mahalanobis, calibrated_on, backend, rates,
    rates_under_fp32_guard, fp32_warn_below_recomputed}; cxr_edge.guard.Guard uses it whenever a
    backend runs that precision. Same rules as the fp32 guard (`fit_input_guard`): parameters
    fitted on every validation frontal, threshold = the `id_quantile` quantile of their
    out-of-fold scores; the features come from the runtime (`runtime_features`) at `precision` on
    `backend`. Also measured: the rates of the fp32 guard on the same features (what the
    precision had without its own guard), and warn_below recomputed from the runtime's fp32
    features (a check that runtime and `collect` agree). Returns the by_precision entry.

    Raises:
        ValueError: `precision` is fp32 or not a run precision of formats.RUNS, the package has no fp32 Mahalanobis guard, or `data_dir` has
            no manifest.csv.
        PackageError: the package does not read (checksums).
    """
    import cxr_edge
    from cxr_edge.guard import read_guard_parameters
    from cxr_edge.package import ModelPackage

    from cxr_edge.formats import RUN_PRECISIONS

    from .experiment import read_split
    if precision == "fp32":
        raise ValueError("fp32 features have the package's own guard (input_guard.mahalanobis: calibrate fit, apply)")
    known = sorted({p for runs in RUN_PRECISIONS.values() for p in runs} - {"fp32"})
    if precision not in known:   # it names the parameter file: only a precision some backend runs
        raise ValueError(f"precision {precision!r} is not a reduced run precision ({', '.join(known)})")
    pkg = ModelPackage.read(package_dir)
    guard = dict(pkg.input_guard or {})
    fp32_params = read_guard_parameters(pkg)
    if fp32_params is None:
        raise ValueError(f"{pkg.root}: no Mahalanobis input guard (input_guard.mahalanobis) to go with")
    manifest = Path(data_dir) / "manifest.csv"
    if not manifest.is_file():
        raise ValueError(f"{data_dir}: no manifest.csv there (its lateral views are measured)")
    k = len(pkg.classes)
    val, test = read_split(split_json, "val"), read_split(split_json, "test")
    labels = np.array([pkg.classes.index(s.label) for s in val])
    with open(manifest, newline="") as fh:
        laterals = [str(Path(data_dir) / r["path"]) for r in csv.DictReader(fh) if r.get("view") == "L"]
    syn = synthetic_set()
    with cxr_edge.load(pkg, backend=backend, precision="fp32") as ref:
        fp32_val = runtime_features(ref, [s.path for s in val])
    with cxr_edge.load(pkg, backend=backend, precision=precision) as clf:
        where = clf.backend.describe()
        feats = {"val": runtime_features(clf, [s.path for s in val]),
                 "test": runtime_features(clf, [s.path for s in test]),
                 "lateral": runtime_features(clf, laterals),
                 "synthetic": runtime_features(clf, [a for _, a in syn])}
    log(f"features: {', '.join(f'{p} {len(f)}' for p, f in feats.items())} on {where}")
    kinds = [kind for kind, _ in syn]
    params = _shipped(GapMahalanobis.fit(feats["val"], labels, k, GUARD_SHRINKAGE))
    scores = {"val": out_of_fold_scores(feats["val"], labels, k),
              **{p: params.score(feats[p]) for p in ("test", "lateral", "synthetic")}}
    thr = round(float(np.quantile(scores["val"], id_quantile)), 4)
    before = {"val": out_of_fold_scores(fp32_val, labels, k, scored=feats["val"]),
              **{p: fp32_params.score(feats[p]) for p in ("test", "lateral", "synthetic")}}
    file = f"input_guard.{precision}.f32"
    (pkg.root / file).write_bytes(params.to_bytes())
    entry = {"warn_below": thr, "mahalanobis": params.record(file), "backend": where,
             "calibrated_on": f"the {id_quantile:.0%} quantile of the score on {len(val)} validation frontal "
                              f"radiographs' {precision} features, each scored out of fold ({GUARD_FOLDS} folds); "
                              f"class means and covariance (shrinkage {GUARD_SHRINKAGE}) fitted on all of them",
             "rates": guard_rates(scores, lambda x: x < thr, kinds),
             "rates_under_fp32_guard": guard_rates(before, lambda x: x < guard["warn_below"], kinds),
             "fp32_warn_below_recomputed": round(float(np.quantile(out_of_fold_scores(fp32_val, labels, k),
                                                                   id_quantile)), 4)}
    guard["by_precision"] = {**(guard.get("by_precision") or {}), precision: entry}
    pkg.input_guard = guard
    _write(pkg)
    return entry


def apply(package_dir, fragment) -> Path:
    """Write the fragment's calibration / operating_points / input_guard into PACKAGE's model.json,
    with the input guard's parameter file (found next to the fragment, see `fit`) copied into the
    package; checksums are re-stamped (ModelPackage.write). Re-running with a new fragment
    replaces the file; guard files the new fragment does not list (the old per-precision guards,
    `fit_precision`: run it again) are removed (an unlisted one would make the package refused).

    Raises:
        ValueError: the fragment's guard file is missing or is not the file it was fitted with.
        PackageError: the package does not read (checksums) before the change.
    """
    from cxr_edge.package import ModelPackage, guard_records
    frag_path = Path(fragment)
    frag = json.loads(frag_path.read_text())
    pkg = ModelPackage.read(package_dir)
    if "input_guard" in frag:
        new = (frag.get("input_guard") or {}).get("mahalanobis")
        if new:
            _copy_guard_file(frag_path, frag, new, pkg.root)
        keep = {rec["file"] for _, rec in guard_records(frag["input_guard"])}
        for _, rec in guard_records(pkg.input_guard):   # e.g. a by_precision guard fitted with the old one
            if rec["file"] not in keep:
                (pkg.root / rec["file"]).unlink(missing_ok=True)
    for key in ("calibration", "operating_points", "input_guard"):
        if key in frag:
            setattr(pkg, key, frag[key])
    return _write(pkg)


def _write(pkg) -> Path:
    out = pkg.write()
    card = (pkg.provenance or {}).get("model_card")
    if card:   # re-render MODEL_CARD.md so it shows the new sections (export/model_card.py calls card_lines)
        from cxr_edge.export.model_card import render
        (pkg.root / "MODEL_CARD.md").write_text(render(pkg, card))
    return out



def _copy_guard_file(frag_path: Path, frag: dict, rec: dict, root: Path) -> None:
    """Copy the guard's parameter file named in the fragment's "files" from the fragment's folder
    into the package as rec["file"], after checking it is the file `fit` recorded."""
    src_name = (frag.get("files") or {}).get(rec["file"])
    if not src_name or Path(src_name).name != src_name:
        raise ValueError(f"{frag_path}: the input guard needs its parameter file; 'files' does not name it "
                         "(re-run fit with --out: it writes the file next to the fragment)")
    src = frag_path.parent / src_name
    if not src.is_file():
        raise ValueError(f"{frag_path}: the input guard's parameter file {src} is missing (fit writes it next to "
                         "the fragment; keep them together)")
    from cxr_edge.package import sha256_file
    if src.stat().st_size != rec["bytes"] or sha256_file(src) != rec["sha256"]:
        raise ValueError(f"{src}: not the parameter file this fragment was fitted with (sha256/size differ)")
    dst = root / rec["file"]
    dst.unlink(missing_ok=True)   # never write through a hard link into another package's file
    shutil.copyfile(src, dst)


def card_lines(pkg) -> list[str]:
    """MODEL_CARD.md sections for the package's calibration, operating points and input guard
    (empty when it has none): the numbers `fit` measured, with the rules."""
    cal, ops, guard = (getattr(pkg, k, None) or {} for k in ("calibration", "operating_points", "input_guard"))
    L: list[str] = []
    if cal:
        e, n = cal.get("ece_15_bins", {}), cal.get("nll", {})
        L += ["", "## Calibration", "",
              f"Probabilities are softmax(logits / T) with T = {cal.get('temperature')} (temperature scaling, "
              f"fitted on the {cal.get('fitted_on', 'validation split')}); labels by argmax are unchanged.", "",
              "| split | ECE before % | ECE after % | NLL before | NLL after |", "|---|---:|---:|---:|---:|"]
        for part in ("val", "test"):
            if f"{part}_before" in e:
                L.append(f"| {part} | {100 * e[f'{part}_before']:.1f} | {100 * e[f'{part}_after']:.1f} | "
                         f"{n.get(f'{part}_before', '')} | {n.get(f'{part}_after', '')} |")
    for name, op in ops.items():
        L += ["", f"## Operating point `{name}` (`--operating-point {name}`)", "",
              f"Rule: {op.get('rule', '')}; threshold {op.get('normal_min_probability')} chosen on the "
              f"{op.get('chosen_on', 'validation split')} for disease sensitivity >= {op.get('target_sensitivity')}.", "",
              "| split | rule | n | disease sensitivity % | specificity (normal kept normal) % | accuracy % | disease called normal |",
              "|---|---|---:|---:|---:|---:|---|"]
        for key, label in (("val", name), ("test", name), ("test_default_argmax", "argmax (default)")):
            r = op.get(key)
            if r:
                dcn = ", ".join(f"{k[:-len('_called_normal')]} {v}/{r.get(k[:-len('_called_normal')] + '_n')}"
                                for k, v in r.items() if k.endswith("_called_normal"))
                L.append(f"| {key.split('_')[0]} | {label} | {r['n']} | {100 * r['sensitivity']:.1f} | "
                         f"{100 * r['specificity']:.1f} | {100 * r['accuracy']:.1f} | {dcn} |")
    if guard:
        r = guard.get("rates", {})
        pct = lambda key, rates=r: f"{100 * rates.get(key, 0):.1f} %"   # noqa: E731
        kinds = ", ".join(f"{k} {100 * v:.0f} %" for k, v in r.get("miss_synthetic_by_kind", {}).items())
        L += ["", "## Input guard", ""]
        if guard.get("mahalanobis"):
            m = guard["mahalanobis"]
            L += [f"A result carries a warning when the DICOM header says the body part is not the chest or the view is "
                  f"lateral/oblique, or when the out-of-distribution score is below {guard.get('warn_below')}: minus "
                  "the smallest class-conditional Mahalanobis distance of the network's global-average-pooled "
                  "feature map, with one shared covariance shrunk towards its mean variance (Lee et al., \"A Simple "
                  "Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks\", NeurIPS "
                  f"2018). Threshold: {guard.get('calibrated_on', '')}. Parameters: {m.get('file')} "
                  f"({m.get('classes')} class means and a rank-{m.get('rank')} precision correction over "
                  f"{m.get('channels')} channels, float32, {m.get('bytes', 0) / 2 ** 20:.2f} MiB, checksummed).", "",
                  f"Measured (torch fp32 features): false alarms on frontal radiographs: validation "
                  f"{pct('false_alarm_val_frontal')} (n {r.get('n_val')}, out of fold), test {pct('false_alarm_test_frontal')} "
                  f"(n {r.get('n_test')}); missed lateral views {pct('miss_lateral')} (n {r.get('n_lateral')}); missed "
                  f"generated non-radiographs {pct('miss_synthetic')} (n {r.get('n_synthetic')}: {kinds}). Lateral "
                  "views are chest radiographs too: the score misses most of them at this false-alarm rate, and the "
                  "DICOM ViewPosition check is what catches them when the header has it."]
            for prec, e in (guard.get("by_precision") or {}).items():
                q, was = e.get("rates", {}), e.get("rates_under_fp32_guard", {})
                L += ["", f"Run at {prec}, the features move, so that precision has its own guard "
                      f"({e.get('mahalanobis', {}).get('file')}, threshold {e.get('warn_below')}: {e.get('calibrated_on')}; "
                      f"features from {e.get('backend')}). Measured: false alarms on frontal radiographs: validation "
                      f"{pct('false_alarm_val_frontal', q)} (out of fold), test {pct('false_alarm_test_frontal', q)}; missed "
                      f"lateral views {pct('miss_lateral', q)}; missed generated non-radiographs {pct('miss_synthetic', q)}. "
                      f"The fp32 guard on the same {prec} features: test false alarms {pct('false_alarm_test_frontal', was)}, "
                      f"missed generated non-radiographs {pct('miss_synthetic', was)}."]
        else:
            L += [f"A result carries a warning when the DICOM header says the body part is not the chest or the view is "
                  f"lateral/oblique, or when the out-of-distribution score {guard.get('score')} is below "
                  f"{guard.get('warn_below')} or above {guard.get('warn_above')} ({guard.get('calibrated_on', '')}).", "",
                  f"Measured: false alarms on the test split's frontal radiographs {pct('false_alarm_test_frontal')} "
                  f"(n {r.get('n_test')}); missed lateral views {pct('miss_lateral')} (n {r.get('n_lateral')}); "
                  f"missed generated non-radiographs {pct('miss_synthetic')} (n {r.get('n_synthetic')}: {kinds})."]
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.train.calibrate", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--split", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--per-kind", type=int, default=10)
    f = sub.add_parser("fit")
    f.add_argument("npz")
    f.add_argument("--out", required=True)
    f.add_argument("--target-sensitivity", type=float, default=0.95)
    f.add_argument("--id-quantile", type=float, default=0.02,
                   help="input guard: warn below this quantile of the validation images' out-of-fold Mahalanobis "
                        "scores (about the false-alarm rate on frontal radiographs)")
    f.add_argument("--id-quantile-high", type=float, default=0.99,
                   help="upper quantile of the energy score, for the report's comparison only")
    f.add_argument("--temperature", type=float, help="use this T instead of fitting one (e.g. 1: no rescaling)")
    a = sub.add_parser("apply")
    a.add_argument("package")
    a.add_argument("fragment")
    pr = sub.add_parser("precision", help="the input guard for a reduced run precision, fitted on its own "
                                          "features (after apply; written into the package)")
    pr.add_argument("package", help="model package directory (changed in place: back it up or work on a copy)")
    pr.add_argument("--split", required=True, help="RUN/split.json written by `cxr-edge train` (its val part: the "
                                                   "frontals the fp32 guard was fitted on; its test part is measured)")
    pr.add_argument("--data", required=True, help="folder with manifest.csv (its lateral views are measured)")
    pr.add_argument("--precision", default="int8", help="run precision to fit a guard for (default: int8)")
    pr.add_argument("--backend", default="openvino", help="backend whose features are used (default: openvino)")
    pr.add_argument("--id-quantile", type=float, default=0.02,
                    help="warn below this quantile of the validation images' out-of-fold scores (default: 0.02)")
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        print(collect(args.checkpoint, args.split, args.data, args.out, args.per_kind))
    elif args.cmd == "fit":
        out = Path(args.out)
        guard_file = out.with_name(out.stem + "." + GUARD_FILE)    # apply() finds it next to the fragment
        frag = fit(args.npz, args.target_sensitivity, args.id_quantile, args.id_quantile_high, args.temperature,
                   guard_file=guard_file)
        out.write_text(json.dumps(frag, indent=2) + "\n")
        print(json.dumps(frag["report"], indent=1))
    elif args.cmd == "precision":
        try:
            rec = fit_precision(args.package, args.split, args.data, args.precision, args.backend, args.id_quantile)
        except (ValueError, OSError, KeyError) as e:   # no guard, a missing split/data file, a split without val/test
            pr.error(str(e))
        print(json.dumps(rec, indent=1))
    else:
        print(apply(args.package, args.fragment))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
