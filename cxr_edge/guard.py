"""Input guard, calibration and operating points at run time (issue 17).

A result gets a warning (`Result.warnings`, each naming the input) when the input is unlikely to
be a frontal chest radiograph:

- DICOM headers: BodyPartExamined present and not a chest term (CHEST_BODY_PARTS); ViewPosition
  lateral or oblique (LATERAL_VIEWS); Modality present and not radiographic (decode already
  refuses most of these; the check stays for inputs decoded elsewhere).
- Out-of-distribution score on the network's own logits: s = logsumexp(logits / T) (negative
  free energy, Liu et al. 2020), T = the package's calibration temperature (1 without one). When
  s < input_guard.warn_below the result warns. The threshold and its measured false-alarm and
  miss rates come from train/calibrate.py and live in model.json ("input_guard"). The score is
  two-sided: the network is *more* confident on many non-radiographs (noise, stripes, text) than on
  X-rays, so a score above `warn_above` warns too. Packages without that key get only the header
  checks.

Calibration: model.json "calibration": {"temperature": T} -> probabilities = softmax(logits / T)
(labels by argmax are unchanged). Operating points: "operating_points": {name: {
"normal_min_probability": t}} -> label normal only when p(normal) >= t (calibrated), otherwise the
most probable disease class.

All functions take numpy arrays; none import torch.
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


class Guard:
    """The package's calibration, input guard and operating points, validated once at load.

    Raises:
        OperatingPointError: `operating_point` is not defined in the package (names those that are).
        ValueError: a malformed temperature / threshold in model.json.
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

    def warnings(self, logits_row: np.ndarray, meta: dict, source: str) -> list[str]:
        """Header warnings plus the OOD warning for one input's (K,) logits."""
        out = header_warnings(meta or {}, source)
        if self.warn_below is not None or self.warn_above is not None:
            s = float(ood_score(np.asarray(logits_row)[None], self.temperature)[0])
            if self.warn_below is not None and s < self.warn_below:
                out.append(f"{source}: does not look like a frontal chest radiograph (out-of-distribution score "
                           f"{s:.2f} < {self.warn_below:.2f})")
            elif self.warn_above is not None and s > self.warn_above:
                out.append(f"{source}: does not look like a frontal chest radiograph (out-of-distribution score "
                           f"{s:.2f} > {self.warn_above:.2f}: more confident than on any radiograph it was checked on)")
        return out
