"""Overlay sink: a class activation map blended over its radiograph, written as PNG.

Not for diagnostic use: every overlay carries that statement in its lower right corner.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DISCLAIMER_SHORT = "Research software - not for diagnostic use"


# -- overlays ---------------------------------------------------------------------------------------
def jet(x: np.ndarray) -> np.ndarray:
    """(H, W) in 0..1 -> (H, W, 3) float32 'jet' colours (no matplotlib on the edge)."""
    x = np.clip(x, 0, 1)[..., None]
    k = np.array([3.0, 2.0, 1.0], np.float32)
    return np.clip(1.5 - np.abs(4.0 * x - k), 0, 1).astype(np.float32)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:       # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_overlay(gray: np.ndarray, cam: np.ndarray, title: str, subtitle: str = "", alpha: float = 0.6) -> Image.Image:
    """The radiograph with the heatmap blended where it is high, a title and the disclaimer."""
    h, w = gray.shape
    if cam.shape != (h, w):
        cam = np.asarray(Image.fromarray(cam.astype(np.float32), "F").resize((w, h), Image.BILINEAR))
    base = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)
    a = (alpha * np.clip(cam, 0, 1))[..., None]     # opacity follows the map: where it is low the film stays readable
    rgb = (base * (1 - a) + jet(cam) * a) * 255.0
    img = Image.fromarray(np.round(rgb).astype(np.uint8), "RGB").convert("RGBA")

    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    big, small = max(12, min(w, h) // 18), max(9, min(w, h) // 40)
    fb, fs = _font(big), _font(small)
    pad = max(3, big // 4)
    lines = [(title, fb)] + ([(subtitle, fs)] if subtitle else [])
    y = pad
    boxes = []
    for text, font in lines:
        l, t, r, b = draw.textbbox((pad, y), text, font=font)
        boxes.append((text, font, (pad, y), (l, t, r, b)))
        y = b + pad // 2
    right = max(bx[3][2] for bx in boxes)
    draw.rectangle((0, 0, right + pad, y + pad // 2), fill=(0, 0, 0, 150))
    for text, font, xy, _ in boxes:
        draw.text(xy, text, font=font, fill=(255, 255, 255, 255))
    l, t, r, b = draw.textbbox((0, 0), DISCLAIMER_SHORT, font=fs)
    x0, y0 = w - (r - l) - 2 * pad, h - (b - t) - 2 * pad
    draw.rectangle((x0, y0, w, h), fill=(0, 0, 0, 150))
    draw.text((x0 + pad - l, y0 + pad - t), DISCLAIMER_SHORT, font=fs, fill=(255, 255, 160, 255))
    return Image.alpha_composite(img, layer).convert("RGB")


class OverlayWriter:
    """Writes `<stem>.cam.png` files into one folder; a second input with the same stem in the same
    run gets `<stem>-2.cam.png`, `-3`, ... (names are owned by this writer, not by the process).

    Args:
        out_dir: the folder (created on first write).
        alpha: heatmap opacity where the map is 1 (0..1).
    """

    def __init__(self, out_dir: Path, alpha: float = 0.6):
        self.out_dir = Path(out_dir)
        self.alpha = float(alpha)
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()

    def path_for(self, source: str) -> Path:
        """The overlay path for one input; stable for the same source within this writer."""
        stem = Path(source).stem if source and not source.startswith("<") else "image"
        with self._lock:
            n = 1
            while True:
                p = self.out_dir / (f"{stem}.cam.png" if n == 1 else f"{stem}-{n}.cam.png")
                owner = self._owners.get(p.name)
                if owner is None or owner == source:
                    self._owners[p.name] = source
                    return p
                n += 1

    def write(self, result, image: np.ndarray | None = None) -> Path:
        """Write `result`'s CAM over its radiograph (original size) as PNG; returns the path.

        Args:
            result: a `Result` with `cam` set (classify with explain=True).
            image: (H, W) float32 0..1 decoded pixels, for in-memory inputs (files are decoded again).
        Raises:
            ValueError: the result has no CAM, or an in-memory input came without `image`.
        """
        if result.cam is None:
            raise ValueError(f"{result.source}: no CAM in this result (classify with explain=True)")
        if image is None:
            if not result.source or result.source.startswith("<"):
                raise ValueError(f"{result.source}: in-memory input; pass its pixels as image=")
            from .decode import decode
            image = decode(result.source).pixels
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prob = result.probability
        title = f"{result.label} {prob:.1%}" if prob is not None else str(result.label)
        subtitle = f"{result.cam_method or 'CAM'} - {result.backend} {result.precision}".strip()
        path = self.path_for(result.source)
        render_overlay(image, result.cam, title, subtitle, self.alpha).save(path, format="PNG")
        return path


def save_overlay(result, out_dir: Path, image: np.ndarray | None = None, alpha: float = 0.6) -> Path:
    """One overlay into `out_dir` (see `OverlayWriter.write`); for runs of many, keep one writer."""
    return OverlayWriter(out_dir, alpha).write(result, image)
