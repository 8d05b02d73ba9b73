"""Training augmentations, applied to the resampled 0..1 image (between preprocess's resample and
normalise steps, through its `augment` hook), so augmented inputs share every other step."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


class Augment:
    def __init__(self, rotation: float = 0.0, hflip: bool = False, zoom: float = 0.0, translate: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, seed: int = 0):
        self.rotation, self.hflip, self.zoom, self.translate = rotation, hflip, zoom, translate
        self.brightness, self.contrast = brightness, contrast
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_dict(cls, d: dict | None, seed: int = 0) -> "Augment | None":
        return cls(**d, seed=seed) if d else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        r = self.rng
        h, w = x.shape
        angle = math.radians(r.uniform(-self.rotation, self.rotation)) if self.rotation else 0.0
        scale = r.uniform(1 - self.zoom, 1 + self.zoom) if self.zoom else 1.0
        tx = r.uniform(-self.translate, self.translate) * w if self.translate else 0.0
        ty = r.uniform(-self.translate, self.translate) * h if self.translate else 0.0
        if angle or scale != 1.0 or tx or ty:
            # inverse affine map output->input around the centre (what PIL's transform wants)
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            cx, cy = w / 2, h / 2
            a, b = cos, sin
            d, e = -sin, cos
            c = cx - a * (cx + tx) - b * (cy + ty)
            f = cy - d * (cx + tx) - e * (cy + ty)
            img = Image.fromarray(x, mode="F").transform((w, h), Image.AFFINE, (a, b, c, d, e, f),
                                                         resample=Image.BILINEAR, fillcolor=float(x.mean()))
            x = np.asarray(img, dtype=np.float32)
        if self.hflip and r.random() < 0.5:
            x = x[:, ::-1]
        if self.brightness or self.contrast:
            m = x.mean()
            x = (x - m) * r.uniform(1 - self.contrast, 1 + self.contrast) + m + r.uniform(-self.brightness, self.brightness)
            x = np.clip(x, 0.0, 1.0)
        return np.ascontiguousarray(x, dtype=np.float32)
