"""The one preprocessing function: (decoded grayscale image, spec) -> model input tensor.

Training, export calibration, the runtime, bench and the native SDK's test vectors all go
through `preprocess`. A model package carries its spec, so no caller chooses a normalisation.

Resampling is Pillow's antialiased bilinear on float32 ('F' mode) images: a well-defined
separable triangle filter whose support grows with the downscale factor, which the C++ SDK
re-implements (double-precision weights and sums, float32 storage) to match within ~1e-6.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .bands import run_bands

RESIZE_POLICIES = ("stretch", "shorter_side_crop")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input (model.json "preprocess"): resize, channels, normalisation.

    Output of `preprocess`: (channels, size, size) float32, ((pixel on 0..1) - mean) / std per channel.

    Raises:
        ValueError: unknown resize policy or interpolation, channels not 1 or 3, mean/std of the wrong
            length or std <= 0, resize_size < size for shorter_side_crop, reducing_gap outside 1..64.
    """
    size: int = 224                       # model input is size x size
    resize: str = "stretch"               # "stretch": whole image to size x size, aspect not kept
                                          # "shorter_side_crop": shorter side to resize_size, centre crop
    resize_size: int | None = None        # for shorter_side_crop (e.g. 256 -> crop 224)
    interpolation: str = "bilinear"
    channels: int = 3                     # 1, or 3 (grayscale replicated: pseudo-RGB)
    mean: tuple = (0.485, 0.456, 0.406)   # per channel, on the 0..1 scale
    std: tuple = (0.229, 0.224, 0.225)
    reducing_gap: float | None = None     # preprocessing v2 option (None: v1, today's exact resample):
                                          # Pillow's resize(reducing_gap=g): an integer box average by
                                          # int(scale / g) per axis first, then the antialiased bilinear
                                          # from the reduced image. Much cheaper from full resolution.

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize policy {self.resize!r} unknown; expected one of {RESIZE_POLICIES}")
        if self.interpolation != "bilinear":
            raise ValueError(f"interpolation {self.interpolation!r} unsupported; only 'bilinear'")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} values each, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize == "shorter_side_crop" and (self.resize_size or 0) < self.size:
            raise ValueError("shorter_side_crop needs resize_size >= size")
        if self.reducing_gap is not None:
            if isinstance(self.reducing_gap, bool) or not isinstance(self.reducing_gap, (int, float)) \
                    or not 1.0 <= float(self.reducing_gap) <= 64.0:
                raise ValueError(f"reducing_gap must be a number from 1 to 64 (or absent), got {self.reducing_gap!r}")
            object.__setattr__(self, "reducing_gap", float(self.reducing_gap))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        """The spec as model.json "preprocess" (no reducing_gap key when None: v1 specs stay byte-identical)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["reducing_gap"] is None:   # v1 specs stay byte-identical, readable by older runtimes
            del d["reducing_gap"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        """The spec from model.json "preprocess".

        Raises:
            ValueError: an unknown key, or a value the spec refuses.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(**d)

    def decode_hint(self) -> int:
        """Smallest side the decoder must deliver for this spec (JPEG draft mode may shrink to it)."""
        return self.resize_size if self.resize == "shorter_side_crop" else self.size


def resize_box(height: int, width: int, spec: PreprocessSpec) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Output size (w, h) and the source box Pillow resamples from, for one image."""
    if spec.resize == "stretch":
        return (spec.size, spec.size), (0.0, 0.0, float(width), float(height))
    # Shorter side to resize_size, then a centre crop of size: computed as one resample from a
    # source box, which equals resize-then-crop and saves resampling pixels that are cut away.
    scale = spec.resize_size / min(height, width)
    new_w, new_h = round(width * scale), round(height * scale)
    left = (new_w - spec.size) // 2
    top = (new_h - spec.size) // 2
    sx, sy = width / new_w, height / new_h
    return (spec.size, spec.size), (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)


SPLIT_MIN_PIXELS = 1 << 21   # below ~2 MP a second thread costs more than it saves


def resample(gray: np.ndarray, spec: PreprocessSpec, threads: int = 1) -> np.ndarray:
    """float32 HxW in 0..1 -> float32 size x size in 0..1 (before normalisation).

    threads > 1 (one large image, e.g. `Classifier.predict_one`): the same resample split over
    threads with bit-identical values (`_resample_split`). Used for v1 specs (no reducing_gap) on
    images of SPLIT_MIN_PIXELS or more; otherwise one Pillow call.
    Raises ValueError: not a 2-D float32 image, or smaller than 2x2."""
    if gray.dtype != np.float32 or gray.ndim != 2:
        raise ValueError(f"preprocess expects a 2-D float32 grayscale image, got {gray.dtype} {gray.shape}")
    h, w = gray.shape
    if h < 2 or w < 2:
        raise ValueError(f"image of {w}x{h} pixels is too small to classify")
    out_size, box = resize_box(h, w, spec)
    if threads > 1 and spec.reducing_gap is None and h * w >= SPLIT_MIN_PIXELS:
        return _resample_split(gray, out_size, box, int(threads))
    img = Image.fromarray(np.ascontiguousarray(gray), mode="F")
    return np.asarray(img.resize(out_size, Image.BILINEAR, box=box, reducing_gap=spec.reducing_gap), dtype=np.float32)


def _resample_split(gray: np.ndarray, out_size, box, threads: int) -> np.ndarray:
    """Pillow's separable resample done as its two passes, the costly first one split by rows.

    Pillow resamples horizontally first (every source row a vertical window reaches, one float32
    row each) and then vertically. Resampling a band of rows with the box's x-range and the band's
    full height runs exactly that horizontal pass on those rows (same coefficients: same width,
    x-range and output width; no vertical pass). The bands fill one full-height float32
    intermediate (rows no window reaches stay 0), and one vertical-only resample over the box's
    y-range gives the same windows and weights as the one-call resample: identical values."""
    (out_w, out_h), (x0, y0, x1, y1) = out_size, box
    h = gray.shape[0]
    support = max(1.0, (y1 - y0) / out_h)             # bilinear: 1 x the downscale factor
    first, last = max(0, int(np.floor(y0 - support)) - 1), min(h, int(np.ceil(y1 + support)) + 1)
    inter = np.zeros((h, out_w), np.float32)

    def horizontal(r0: int, r1: int) -> None:
        band = Image.fromarray(np.ascontiguousarray(gray[r0:r1]), mode="F")
        inter[r0:r1] = np.asarray(band.resize((out_w, r1 - r0), Image.BILINEAR, box=(x0, 0, x1, r1 - r0)))

    run_bands(horizontal, first, last, threads)
    img = Image.fromarray(inter, mode="F")
    return np.asarray(img.resize((out_w, out_h), Image.BILINEAR, box=(0, y0, out_w, y1)), dtype=np.float32)


def normalise(resized: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """size x size in 0..1 -> C x size x size, normalised with the spec's mean/std."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    inv_std = (1.0 / np.asarray(spec.std, np.float64)).astype(np.float32)[:, None, None]
    x = np.broadcast_to(resized, (spec.channels,) + resized.shape)
    return ((x - mean) * inv_std).astype(np.float32)


def preprocess(gray: np.ndarray, spec: PreprocessSpec, augment=None, threads: int = 1) -> np.ndarray:
    """The model input (C, size, size) float32 for one decoded image.

    `augment` (training only) maps the resampled 0..1 image to another of the same shape; it
    runs before normalisation so augmented and plain inputs share every other step.
    `threads`: resample one large image on that many threads (`resample`; same values).
    """
    x = resample(gray, spec, threads)
    if augment is not None:
        x = np.asarray(augment(x), dtype=np.float32)
    return normalise(x, spec)
