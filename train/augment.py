"""Training augmentations, applied to the resampled 0..1 image (between preprocess's resample and
normalise steps, through its `augment` hook), so augmented inputs share every other step.

Geometry: rotation, hflip, zoom, translate, and `crop` (random-resized crop: area fraction in
[1 - crop, 1], aspect ratio jitter `crop_aspect`).
Intensity: brightness, contrast, `gamma` (x ** g with log g uniform in [-log(1+gamma), log(1+gamma)]),
`equalize` (probability of blending in the histogram-equalised image by a random weight).
Source-cue countermeasures (the Cohen figures carry arrows, letters and corner markers; the
Kermany224 copies are low-resolution): `erase_border` (probability of erasing 1-3 rectangles that
touch an image border or corner, filled with black, white, the image mean or noise), `markers`
(probability of drawing 1-3 synthetic markers — bright/dark text, arrows, boxes — onto any class
so markers stop predicting the label), `lowres` (probability of a down-up resample by a factor in
[0.35, 0.9]) and `noise` (Gaussian noise, std uniform in [0, noise]).

Every parameter defaults to off; an experiment's "augment" dict names the ones it uses.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


class Augment:
    def __init__(self, rotation: float = 0.0, hflip: bool = False, zoom: float = 0.0, translate: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, crop: float = 0.0, crop_aspect: float = 0.0,
                 gamma: float = 0.0, equalize: float = 0.0, erase_border: float = 0.0, markers: float = 0.0,
                 lowres: float = 0.0, noise: float = 0.0, seed: int = 0):
        self.rotation, self.hflip, self.zoom, self.translate = rotation, hflip, zoom, translate
        self.brightness, self.contrast = brightness, contrast
        self.crop, self.crop_aspect, self.gamma, self.equalize = crop, crop_aspect, gamma, equalize
        self.erase_border, self.markers, self.lowres, self.noise = erase_border, markers, lowres, noise
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_dict(cls, d: dict | None, seed: int = 0) -> "Augment | None":
        return cls(**d, seed=seed) if d else None

    # -- geometry ---------------------------------------------------------------------------------
    def _crop(self, x: np.ndarray) -> np.ndarray:
        r = self.rng
        h, w = x.shape
        area = r.uniform(1 - self.crop, 1.0)
        aspect = math.exp(r.uniform(-self.crop_aspect, self.crop_aspect)) if self.crop_aspect else 1.0
        cw = min(w, max(8, int(round(w * math.sqrt(area * aspect)))))
        ch = min(h, max(8, int(round(h * math.sqrt(area / aspect)))))
        x0, y0 = int(r.integers(0, w - cw + 1)), int(r.integers(0, h - ch + 1))
        img = Image.fromarray(np.ascontiguousarray(x[y0:y0 + ch, x0:x0 + cw]), mode="F")
        return np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.float32)

    def _affine(self, x: np.ndarray) -> np.ndarray:
        r = self.rng
        h, w = x.shape
        angle = math.radians(r.uniform(-self.rotation, self.rotation)) if self.rotation else 0.0
        scale = r.uniform(1 - self.zoom, 1 + self.zoom) if self.zoom else 1.0
        tx = r.uniform(-self.translate, self.translate) * w if self.translate else 0.0
        ty = r.uniform(-self.translate, self.translate) * h if self.translate else 0.0
        if not (angle or scale != 1.0 or tx or ty):
            return x
        # inverse affine map output->input around the centre (what PIL's transform wants)
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        cx, cy = w / 2, h / 2
        a, b = cos, sin
        d, e = -sin, cos
        c = cx - a * (cx + tx) - b * (cy + ty)
        f = cy - d * (cx + tx) - e * (cy + ty)
        img = Image.fromarray(x, mode="F").transform((w, h), Image.AFFINE, (a, b, c, d, e, f),
                                                     resample=Image.BILINEAR, fillcolor=float(x.mean()))
        return np.asarray(img, dtype=np.float32)

    # -- intensity --------------------------------------------------------------------------------
    def _equalize(self, x: np.ndarray) -> np.ndarray:
        q = np.clip(x * 255.0, 0, 255).astype(np.uint8)
        hist = np.bincount(q.ravel(), minlength=256).astype(np.float64)
        cdf = np.cumsum(hist)
        cdf = (cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0)
        eq = cdf[q].astype(np.float32)
        a = self.rng.uniform(0.2, 1.0)
        return (1 - a) * x + a * eq

    # -- source-cue countermeasures ---------------------------------------------------------------
    def _fill(self, shape, mean: float) -> np.ndarray | float:
        k = self.rng.integers(4)
        if k == 0:
            return 0.0
        if k == 1:
            return 1.0
        if k == 2:
            return mean
        return self.rng.uniform(0, 1, shape).astype(np.float32)

    def _erase_border(self, x: np.ndarray) -> np.ndarray:
        r = self.rng
        h, w = x.shape
        x = x.copy()
        m = float(x.mean())
        for _ in range(int(r.integers(1, 4))):
            eh = max(1, int(h * r.uniform(0.04, 0.22)))
            ew = max(1, int(w * r.uniform(0.04, 0.22)))
            side = r.integers(6)  # 0-3 corners, 4 top/bottom strip, 5 left/right strip
            if side < 4:
                y0 = 0 if side in (0, 1) else h - eh
                x0 = 0 if side in (0, 2) else w - ew
            elif side == 4:
                eh = max(1, int(h * r.uniform(0.03, 0.12)))
                ew = int(w * r.uniform(0.3, 1.0))
                y0 = 0 if r.random() < 0.5 else h - eh
                x0 = int(r.integers(0, w - ew + 1))
            else:
                ew = max(1, int(w * r.uniform(0.03, 0.12)))
                eh = int(h * r.uniform(0.3, 1.0))
                x0 = 0 if r.random() < 0.5 else w - ew
                y0 = int(r.integers(0, h - eh + 1))
            x[y0:y0 + eh, x0:x0 + ew] = self._fill((eh, ew), m)
        return x

    def _markers(self, x: np.ndarray) -> np.ndarray:
        r = self.rng
        h, w = x.shape
        img = Image.fromarray(np.ascontiguousarray(x), mode="F")
        dr = ImageDraw.Draw(img)
        for _ in range(int(r.integers(1, 4))):
            val = 1.0 if r.random() < 0.75 else 0.0
            # markers live near the borders more often than not
            if r.random() < 0.7:
                cx = float(r.choice([r.uniform(0, 0.2), r.uniform(0.8, 1.0)])) * w
                cy = float(r.uniform(0, 1)) * h
            else:
                cx, cy = float(r.uniform(0.15, 0.85)) * w, float(r.uniform(0.15, 0.85)) * h
            s = max(3.0, float(r.uniform(0.03, 0.10)) * w)
            kind = r.integers(3)
            lw = max(1, int(s / 5))
            if kind == 0:    # letter-like strokes ("L", "R", "AP")
                dr.text((cx, cy), str(r.choice(["L", "R", "AP", "PA", "1", "A"])), fill=val)
                dr.line([(cx, cy), (cx, cy + s), (cx + s * 0.6, cy + s)], fill=val, width=lw)
            elif kind == 1:  # arrow
                ang = r.uniform(0, 2 * math.pi)
                ex, ey = cx + s * 1.5 * math.cos(ang), cy + s * 1.5 * math.sin(ang)
                dr.line([(cx, cy), (ex, ey)], fill=val, width=lw)
                for da in (2.6, -2.6):
                    dr.line([(ex, ey), (ex + s * 0.5 * math.cos(ang + da), ey + s * 0.5 * math.sin(ang + da))],
                            fill=val, width=lw)
            else:            # box / filled tag
                box = [cx, cy, cx + s, cy + s * 0.6]
                if r.random() < 0.5:
                    dr.rectangle(box, fill=val)
                else:
                    dr.rectangle(box, outline=val, width=lw)
        return np.asarray(img, dtype=np.float32)

    def _lowres(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        f = self.rng.uniform(0.35, 0.9)
        img = Image.fromarray(x, mode="F")
        small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.BILINEAR)
        return np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: float32 (H, W) in 0..1 -> augmented float32 (H, W) in 0..1, C-contiguous."""
        r = self.rng
        x = np.asarray(x, dtype=np.float32)
        if self.crop:
            x = self._crop(x)
        if self.rotation or self.zoom or self.translate:
            x = self._affine(x)
        if self.hflip and r.random() < 0.5:
            x = x[:, ::-1]
        if self.lowres and r.random() < self.lowres:
            x = self._lowres(np.ascontiguousarray(x))
        if self.equalize and r.random() < self.equalize:
            x = self._equalize(x)
        if self.gamma:
            g = math.exp(r.uniform(-math.log1p(self.gamma), math.log1p(self.gamma)))
            x = np.clip(x, 0.0, 1.0) ** g
        if self.brightness or self.contrast:
            m = x.mean()
            x = (x - m) * r.uniform(1 - self.contrast, 1 + self.contrast) + m + r.uniform(-self.brightness, self.brightness)
        if self.erase_border and r.random() < self.erase_border:
            x = self._erase_border(x)
        if self.markers and r.random() < self.markers:
            x = self._markers(np.ascontiguousarray(x, dtype=np.float32))
        if self.noise:
            x = x + r.normal(0.0, r.uniform(0, self.noise), x.shape).astype(np.float32)
        x = np.clip(x, 0.0, 1.0)
        return np.ascontiguousarray(x, dtype=np.float32)
