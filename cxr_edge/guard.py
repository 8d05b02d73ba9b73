"""Input guard, calibration and operating points at run time (issue 17).

A result gets a warning (`Result.warnings`, each naming the input) when the input is unlikely to
be a frontal chest radiograph:

- DICOM headers: BodyPartExamined present and not a chest term (CHEST_BODY_PARTS); ViewPosition
  lateral or oblique (LATERAL_VIEWS); Modality present and not radiographic (decode already
  refuses most of these; the check stays for inputs decoded elsewhere).
- Out-of-distribution score on the network's own feature map (packages with an
  "input_guard.mahalanobis" parameter file): f = the global average of the (C, h, w) "features"
  output (what the head pools), s(f) = -min_k (f - mu_k)^T P (f - mu_k), the class-conditional
  Mahalanobis score with one shared covariance (Lee et al., "A Simple Unified Framework for
  Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018; last layer only,
  no input perturbation). P inverts the class-centred covariance shrunk towards its mean variance,
  stored as a I - U U^T (GapMahalanobis). When s < input_guard.warn_below the result warns. The
  parameters and the threshold come from train/calibrate.py `fit` (the 2 % quantile of the
  validation frontals' out-of-fold scores); the file is listed in model.json with its sha256 and
  refused when it does not match. Measured on v1 (the shipped DenseNet121, torch fp32 features):
  false alarms on frontal radiographs 2.1 % (validation, 428, out of fold) and 1.9 % (test, 471);
  missed lateral views 92.9 % (28: chest radiographs too, caught by the DICOM ViewPosition check
  when a header has it); missed generated non-radiographs 10.8 % (120; by kind: radial gradients
  and gray blob "photographs" 50 %, shapes 20 %, linear gradients 10 %, noise, text, stripes,
  checkerboards and blank images 0 %). The energy score (next) missed 60 % of those images.
  Through the runtime (decode, preprocess, ONNX "features"), fp32 reproduces those scores (test
  max |difference| 0.0002). A reduced precision moves the features (the shipped QAT int8 under the
  fp32 guard: 5.5 % test false alarms), so a package may carry a guard per run precision fitted on
  that precision's features ("input_guard.by_precision", train/calibrate.py `fit_precision`;
  `Guard.use_precision`): the default package's int8 guard gives 1.1 % test false alarms, laterals
  missed 89.3 %, generated missed 11.7 %.
- Packages without that file keep the energy score on the logits: s = logsumexp(logits / T)
  (negative free energy, Liu et al. 2020), T = the package's calibration temperature (1 without
  one), two-sided (`warn_below`, `warn_above`: the network is *more* confident on many
  non-radiographs than on X-rays). Packages without "input_guard" get only the header checks.

Calibration: model.json "calibration": {"temperature": T} -> probabilities = softmax(logits / T)
(labels by argmax are unchanged). Operating points: "operating_points": {name: {
"normal_min_probability": t}} -> label normal only when p(normal) >= t (calibrated), otherwise the
most probable disease class.

All functions take numpy arrays; none import torch. The Mahalanobis score needs the feature map
with every batch (`Guard.needs_features`); the backends compute it anyway (the head pools it), so
asking for it costs only its copy out.
"""
from __future__ import annotations

import numpy as np

CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LUNG", "TORAX", "THORAX_CHEST", "PORT CHEST",
                    "PORTABLE CHEST", "CXR", "BRUST", "POITRINE", "TORACE")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLO", "RLO", "LAO", "RAO", "LPO", "RPO", "OBL", "OBLIQUE")
RADIOGRAPHIC_MODALITIES = ("CR", "DX", "RG", "DR", "XR", "OT", "SC", "PX")


class OperatingPointError(ValueError):
    """An operating point the package does not define, or a malformed one."""


def header_warnings(meta: dict, source: str) -> list[str]:
    """Warnings from decoded DICOM header fields (decode meta keys `modality`, `body_part`,
    `view_position`; absent or empty values never warn). Returns a list of str naming `source`."""
    out = []
    body = str(meta.get("body_part") or "").strip().upper()
    if body and body not in CHEST_BODY_PARTS:
        out.append(f"{source}: DICOM BodyPartExamined is {body}, not chest: the model only knows frontal chest radiographs")
    view = str(meta.get("view_position") or "").strip().upper()
    if view in LATERAL_VIEWS:
        out.append(f"{source}: DICOM ViewPosition is {view} (lateral/oblique): the model was trained on frontal "
                   "(PA/AP) views only")
    mod = str(meta.get("modality") or "").strip().upper()
    if meta.get("format") == "DICOM" and mod and mod not in RADIOGRAPHIC_MODALITIES:
        out.append(f"{source}: DICOM Modality is {mod}, not a radiograph")
    return out


def ood_score(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(N, K) logits -> (N,) float64 logsumexp(logits / T); lower = less like the training images."""
    z = np.asarray(logits, np.float64) / float(temperature)
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


# -- Mahalanobis score on pooled features (Lee et al., NeurIPS 2018) ---------------------------------
GUARD_FILE = "input_guard.f32"          # the parameter file's name inside a package
GUARD_LAYOUT = ("raw little-endian float32, row-major: class means (classes x channels), then the "
                "precision correction U (channels x rank)")


class GapMahalanobis:
    """Class-conditional Mahalanobis distance of global-average-pooled features, one shared shrunk
    covariance (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples
    and Adversarial Attacks", NeurIPS 2018; last feature map only, no input perturbation).

    d_k(f) = (f - mu_k)^T P (f - mu_k) for each class k, f the (C,) spatial mean of the network's
    (C, h, w) feature map; score(f) = -min_k d_k(f) (higher = more like the fitting images).
    The precision P = inverse of (1 - shrinkage) * S + shrinkage * trace(S) / C * I (S the
    covariance of the class-centred features) is stored compactly and exactly as
    P = a * I - U U^T: a = `isotropic_precision`, U (C, r) with r <= min(C, n - K), the
    directions where S has variance (a few hundred fitting images, so about half the size of C x C).

    Args:
        means: (K, C) class means. correction: (C, r) U. isotropic_precision: a > 0.

    Raises:
        ValueError: shapes that do not fit together, non-finite values, a <= 0.
    """

    def __init__(self, means: np.ndarray, correction: np.ndarray, isotropic_precision: float):
        self.means = np.asarray(means, np.float64)
        self.correction = np.asarray(correction, np.float64)
        self.isotropic_precision = float(isotropic_precision)
        if self.means.ndim != 2 or self.correction.ndim != 2 or self.correction.shape[0] != self.means.shape[1]:
            raise ValueError(f"Mahalanobis parameters: means {self.means.shape} and correction "
                             f"{self.correction.shape} must be (K, C) and (C, r)")
        if not (np.isfinite(self.means).all() and np.isfinite(self.correction).all()):
            raise ValueError("Mahalanobis parameters: non-finite values")
        if not (np.isfinite(self.isotropic_precision) and self.isotropic_precision > 0):
            raise ValueError(f"Mahalanobis parameters: isotropic_precision must be > 0, got {isotropic_precision}")
        # the projection on U runs in float32: half the memory traffic of float64, and the small
        # matrix product is the guard's whole cost (on v1's features: scores within 0.02 of float64)
        self._u32 = np.ascontiguousarray(self.correction, np.float32)
        self._means_proj = self._project(self.means)              # (K, r): U^T mu_k, once

    @property
    def channels(self) -> int:
        """C, the feature channels the parameters were fitted on."""
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        """r, the columns of the precision correction U."""
        return self.correction.shape[1]

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, num_classes: int,
            shrinkage: float = 0.1) -> GapMahalanobis:
        """Fit on (N, C) pooled features (or (N, C, h, w) maps) of in-distribution images with (N,)
        class indices 0..num_classes-1: class means, one covariance of the class-centred features
        (np.cov, N - 1), shrunk towards its mean variance by `shrinkage` (0 < shrinkage <= 1).

        Raises:
            ValueError: a class without images, labels out of range, shrinkage outside (0, 1].
        """
        f = pool_features(features)
        y = np.asarray(labels)
        if not 0 < shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
        if len(y) != len(f) or (len(y) and (y.min() < 0 or y.max() >= num_classes)):
            raise ValueError(f"labels must be {len(f)} class indices in 0..{num_classes - 1}")
        counts = np.bincount(y, minlength=num_classes)
        if (counts == 0).any():
            raise ValueError(f"classes without fitting images: {np.flatnonzero(counts == 0).tolist()}")
        means = np.stack([f[y == k].mean(0) for k in range(num_classes)])
        cov = np.atleast_2d(np.cov(f - means[y], rowvar=False))
        lam, vec = np.linalg.eigh(cov)
        s = shrinkage * float(np.trace(cov)) / cov.shape[0]   # the shrunk covariance's smallest variance
        if not s > 0:
            raise ValueError("the fitting features have no variance")
        keep = lam > 1e-12 * max(float(lam.max()), 1e-300)   # zero-variance directions need no correction
        # P = V diag(1 / ((1 - shrinkage) lam + s)) V^T = I / s - V diag(1 / s - 1 / (...)) V^T
        weights = 1.0 / s - 1.0 / ((1.0 - shrinkage) * lam[keep] + s)
        return cls(means, vec[:, keep] * np.sqrt(weights), 1.0 / s)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, C) pooled features or (N, C, h, w) maps -> (N, K) float64 squared Mahalanobis distances.

        Raises:
            ValueError: the channel count differs from the parameters'.
        """
        f = pool_features(features)
        if f.shape[1] != self.channels:
            raise ValueError(f"features have {f.shape[1]} channels, the input guard was fitted on {self.channels}")
        proj = self._project(f)
        out = np.empty((len(f), len(self.means)))
        for k, (mu, mp) in enumerate(zip(self.means, self._means_proj)):
            out[:, k] = self.isotropic_precision * ((f - mu) ** 2).sum(1) - ((proj - mp) ** 2).sum(1)
        return out

    def _project(self, f: np.ndarray) -> np.ndarray:
        return (f.astype(np.float32) @ self._u32).astype(np.float64)

    def score(self, features: np.ndarray) -> np.ndarray:
        """(N, C) or (N, C, h, w) -> (N,) float64 minus the smallest class distance; lower = less like
        the fitting images."""
        return -self.distances(features).min(1)

    def to_bytes(self) -> bytes:
        """The parameter file's content (GUARD_LAYOUT); float32, so a fit should score with
        `from_bytes(to_bytes())` to measure what ships."""
        return (self.means.astype("<f4").tobytes() + self.correction.astype("<f4").tobytes())

    @classmethod
    def from_bytes(cls, raw: bytes, classes: int, channels: int, rank: int,
                   isotropic_precision: float) -> GapMahalanobis:
        """Parameters from a file's bytes (GUARD_LAYOUT) and its model.json record's shape fields.

        Raises:
            ValueError: the byte count does not match 4 * (classes * channels + channels * rank).
        """
        want = 4 * (classes * channels + channels * rank)
        if len(raw) != want:
            raise ValueError(f"{len(raw)} bytes, {want} expected for {classes} x {channels} means and "
                             f"a {channels} x {rank} correction (float32)")
        a = np.frombuffer(raw, "<f4")
        return cls(a[:classes * channels].reshape(classes, channels),
                   a[classes * channels:].reshape(channels, rank), isotropic_precision)

    def record(self, file: str = GUARD_FILE) -> dict:
        """The model.json "input_guard.mahalanobis" entry for these parameters, without sha256/bytes
        (ModelPackage.write stamps them from the file)."""
        return {"file": file, "classes": len(self.means), "channels": self.channels,
                "rank": self.rank, "isotropic_precision": self.isotropic_precision,
                "layout": GUARD_LAYOUT, "features_output": "features"}


def pool_features(features: np.ndarray) -> np.ndarray:
    """(N, C, h, w) feature maps -> (N, C) float64 spatial means (global average pooling, as the
    network's own head does); (N, C) passes through as float64.

    Raises:
        ValueError: neither 2 nor 4 dimensions.
    """
    f = np.asarray(features)
    if f.ndim == 4:
        return f.astype(np.float64).mean((2, 3))
    if f.ndim == 2:
        return f.astype(np.float64)
    raise ValueError(f"features must be (N, C) or (N, C, h, w), got shape {f.shape}")


def read_guard_parameters(package, precision: str | None = None) -> GapMahalanobis | None:
    """The package's Mahalanobis parameters: model.json "input_guard.mahalanobis" (fitted on fp32
    features), or with `precision` "input_guard.by_precision.<precision>.mahalanobis"; None when
    the package has no such record. The file is checked like every listed file
    (package.verify_file: inside the package, size, SHA-256), and the bytes parsed are hashed
    again, so a file swapped after the check is refused too.

    Raises:
        PackageError: the file is missing, replaced, or does not fit its record.
    """
    import hashlib

    from .package import PackageError, guard_records, verify_file
    field = "input_guard.mahalanobis" if precision is None else f"input_guard.by_precision.{precision}.mahalanobis"
    rec = dict(guard_records(getattr(package, "input_guard", None))).get(field)
    if not rec:
        return None
    root = package.root
    try:
        verify_file(root, rec["file"], rec["sha256"], rec["bytes"], field)
        with open(root / rec["file"], "rb") as f:
            raw = f.read(rec["bytes"] + 1)
        if hashlib.sha256(raw).hexdigest() != rec["sha256"]:
            raise PackageError(f"{root}: {field} file {rec['file']} changed after its checksum was verified")
        return GapMahalanobis.from_bytes(raw, int(rec["classes"]), int(rec["channels"]), int(rec["rank"]),
                                         float(rec["isotropic_precision"]))
    except KeyError as e:
        raise PackageError(f"{root}: {field}: missing {e}") from None
    except ValueError as e:
        raise PackageError(f"{root}: {field} file {rec.get('file')}: {e}") from None


class Guard:
    """The package's calibration, input guard and operating points, validated once at load.

    Raises:
        OperatingPointError: `operating_point` is not defined in the package (names those that are).
        ValueError: a malformed temperature / threshold in model.json.
        PackageError: the input guard's parameter file is missing, does not match its checksum, or
            does not fit its record.
    """

    def __init__(self, package, operating_point: str | None = None):
        cal = package.calibration if isinstance(getattr(package, "calibration", None), dict) else {}
        guard = package.input_guard if isinstance(getattr(package, "input_guard", None), dict) else {}
        ops = package.operating_points if isinstance(getattr(package, "operating_points", None), dict) else {}
        t = float(cal.get("temperature", 1.0))
        if not np.isfinite(t) or t <= 0:
            raise ValueError(f"{package.root}: calibration.temperature must be a positive number, got {t}")
        self.temperature = t
        w = guard.get("warn_below")
        self.warn_below = float(w) if w is not None else None
        a = guard.get("warn_above")
        self.warn_above = float(a) if a is not None else None
        for key, v in (("warn_below", self.warn_below), ("warn_above", self.warn_above)):
            if v is not None and not np.isfinite(v):
                raise ValueError(f"{package.root}: input_guard.{key} must be finite, got {v}")
        # with a parameter file, warn_below applies to the Mahalanobis score instead of the energy
        self.mahalanobis = read_guard_parameters(package)
        if self.mahalanobis is not None:
            if self.warn_below is None or self.warn_above is not None:
                raise ValueError(f"{package.root}: input_guard with 'mahalanobis' needs warn_below and no "
                                 "warn_above (a one-sided score)")
            if len(self.mahalanobis.means) != len(package.classes):
                raise ValueError(f"{package.root}: input_guard.mahalanobis has {len(self.mahalanobis.means)} "
                                 f"class means, the package {len(package.classes)} classes")
        by = guard.get("by_precision") or {}
        if by and self.mahalanobis is None:
            raise ValueError(f"{package.root}: input_guard.by_precision needs the fp32 guard ('mahalanobis')")
        for prec, entry in by.items():
            v = float(entry["warn_below"])
            if not np.isfinite(v):
                raise ValueError(f"{package.root}: input_guard.by_precision.{prec}.warn_below must be finite, got {v}")
        self._package = package
        self._fp32_guard = (self.mahalanobis, self.warn_below)
        self.precision = None
        self.classes = list(package.classes)
        self.normal_index = self.classes.index(package.normal_class) if package.normal_class in self.classes else None
        self.operating_point = operating_point
        self.normal_min = None
        if operating_point:
            if operating_point not in ops:
                known = ", ".join(sorted(ops)) or "none"
                raise OperatingPointError(f"{package.root}: operating point {operating_point!r} is not defined in "
                                          f"model.json (defined: {known})")
            if self.normal_index is None:
                raise OperatingPointError(f"{package.root}: operating point {operating_point!r} needs a normal_class")
            t = float(ops[operating_point].get("normal_min_probability", float("nan")))
            if not 0.0 <= t <= 1.0:
                raise OperatingPointError(f"{package.root}: operating_points.{operating_point}.normal_min_probability "
                                          f"must be in 0..1, got {t}")
            self.normal_min = t

    def use_precision(self, precision: str | None) -> None:
        """Score the feature map of the loaded backend's run precision with the guard fitted on that
        precision's features (input_guard.by_precision[precision]: its own parameter file and
        threshold) when the package has one, else with the fp32 guard. A reduced precision moves
        the features: the default package's QAT int8 artifact scored under the fp32 guard warned
        on 5.5 % of test frontal radiographs (fp32: 1.9 %).

        Raises:
            PackageError: the precision's parameter file is missing, replaced, or does not fit.
        """
        entry = ((getattr(self._package, "input_guard", None) or {}).get("by_precision") or {}).get(precision)
        if entry and self._fp32_guard[0] is not None:
            self.mahalanobis = read_guard_parameters(self._package, precision)
            self.warn_below = float(entry["warn_below"])
        else:
            self.mahalanobis, self.warn_below = self._fp32_guard
        self.precision = precision

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """(N, K) logits -> (N, K) float64 calibrated softmax (postprocess.softmax of logits / T;
        exactly postprocess.softmax(logits) without a temperature)."""
        from .postprocess import softmax
        z = np.asarray(logits)
        return softmax(z if self.temperature == 1.0 else z.astype(np.float64) / self.temperature)

    def labels(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) probabilities -> (N,) class indices: argmax, or the operating point's rule."""
        if self.normal_min is None:
            return probs.argmax(1)
        masked = np.array(probs, np.float64, copy=True)
        masked[:, self.normal_index] = -1.0
        return np.where(probs[:, self.normal_index] >= self.normal_min, self.normal_index, masked.argmax(1))

    @property
    def needs_features(self) -> bool:
        """True when the input guard scores the feature map (a Mahalanobis parameter file): the
        backend must return 'features' with every batch."""
        return self.mahalanobis is not None

    def check_features(self, features, where: str) -> None:
        """Check a backend's 'features' output (N, C, h, w) against the guard's parameters (nothing
        to check without them). `where` names the artifact in the message.

        Raises:
            PackageError: no feature map, or another channel count than the parameters were fitted on.
        """
        if self.mahalanobis is None:
            return
        from .package import PackageError
        shape = None if features is None else tuple(np.shape(features))
        if shape is None or len(shape) != 4 or shape[1] != self.mahalanobis.channels:
            raise PackageError(f"{where}: the input guard (input_guard.mahalanobis) needs a 'features' output of "
                               f"{self.mahalanobis.channels} channels, the backend returned "
                               f"{'none' if shape is None else shape}")

    def ood_scores(self, logits: np.ndarray, features: np.ndarray | None = None) -> np.ndarray | None:
        """(N,) float64 out-of-distribution scores of a batch (lower = less like a radiograph): the
        Mahalanobis score of the (N, C, h, w) feature maps when the package has its parameters,
        else the energy score of the (N, K) logits when it has thresholds; None without either.

        Raises:
            ValueError: the guard scores the feature map and `features` is None.
        """
        if self.mahalanobis is not None:
            if features is None:
                raise ValueError("the input guard scores the feature map: pass the backend's 'features'")
            return self.mahalanobis.score(features)
        if self.warn_below is not None or self.warn_above is not None:
            return ood_score(logits, self.temperature)
        return None

    def warnings(self, logits_row: np.ndarray, meta: dict, source: str, features_row: np.ndarray | None = None,
                 score: float | None = None) -> list[str]:
        """Header warnings plus the out-of-distribution warning for one input. `score`: its entry
        of `ood_scores` (a batch scores at once); without it the score is computed from the (K,)
        logits and, when `needs_features`, the (C, h, w) feature map.

        Raises:
            ValueError: the guard needs features and neither `score` nor `features_row` is given.
        """
        out = header_warnings(meta or {}, source)
        if score is None:
            s = self.ood_scores(np.asarray(logits_row)[None], None if features_row is None else np.asarray(features_row)[None])
            score = None if s is None else float(s[0])
        if score is None:
            return out
        if self.mahalanobis is not None:
            if score < self.warn_below:
                out.append(f"{source}: does not look like a frontal chest radiograph (out-of-distribution score "
                           f"{score:.1f} < {self.warn_below:.1f}: its features are far from every class's "
                           "radiographs, Mahalanobis distance)")
        elif self.warn_below is not None and score < self.warn_below:
            out.append(f"{source}: does not look like a frontal chest radiograph (out-of-distribution score "
                       f"{score:.2f} < {self.warn_below:.2f})")
        elif self.warn_above is not None and score > self.warn_above:
            out.append(f"{source}: does not look like a frontal chest radiograph (out-of-distribution score "
                       f"{score:.2f} > {self.warn_above:.2f}: more confident than on any radiograph it was checked on)")
        return out
