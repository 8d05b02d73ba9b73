"""The package's reference set: K resampled images and the torch fp32 reference's outputs on them,
so any runtime (Python backends, the C SDK, a device after an update) can check that it computes
what the exporter measured.

Format (shared contract): `reference.u16` = raw little-endian uint16, shape (K, size, size), value
round(x * 65535) where x is `preprocess.resample`'s 0..1 output (before normalise). model.json:
"reference_set": {file, sha256, bytes, shape [K, H, W], scale 65535, source, logits [[...]],
probabilities [[...]]} — logits and probabilities from torch fp32 on normalise(u16 / 65535).

Two ways to fill it:
- user exports: `from_paths` on K images of the parity split (or images the user names);
- the shipped default package: `sample_variants` — only redistributable images (samples/) plus
  deterministic variants of them (crops, scale, gamma, contrast, rotation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cxr_edge.decode import decode
from cxr_edge.preprocess import PreprocessSpec, normalise, resample

FILE = "reference.u16"
SCALE = 65535


def encode(x01: np.ndarray) -> np.ndarray:
    """(K, H, W) float 0..1 -> (K, H, W) little-endian uint16, round(x * 65535) after clipping to 0..1."""
    x = np.asarray(x01, np.float64)
    if x.ndim != 3:
        raise ValueError(f"reference images must be (K, H, W), got shape {x.shape}")
    return np.round(np.clip(x, 0.0, 1.0) * SCALE).astype("<u2")


def decode_u16(u16: np.ndarray) -> np.ndarray:
    """(K, H, W) uint16 -> (K, H, W) float32 0..1: what every reader feeds to normalise."""
    return (np.asarray(u16, np.float32) / np.float32(SCALE)).astype(np.float32)


def from_paths(paths, spec: PreprocessSpec) -> np.ndarray:
    """Image files -> (K, size, size) float32 0..1, decoded and resampled exactly as the runtime does.
    Raises DecodeError naming the file for an unreadable image."""
    return np.stack([resample(decode(p, min_side=spec.decode_hint()).pixels, spec) for p in paths])


VARIANTS = ("original", "crop 90% centre", "crop 80% top-left", "downscaled to 1/4", "gamma 0.8", "gamma 1.25",
            "contrast 0.8 about the mean", "rotated +5 deg", "rotated -5 deg")


def _variants(gray: np.ndarray, spec: PreprocessSpec) -> list[tuple[str, np.ndarray]]:
    """Deterministic variants of one decoded 0..1 grayscale image, each resampled to the model size."""
    h, w = gray.shape
    img = Image.fromarray(np.ascontiguousarray(gray, np.float32), mode="F")

    def crop(fx0, fy0, fx1, fy1):
        return np.asarray(img.crop((int(w * fx0), int(h * fy0), int(w * fx1), int(h * fy1))), np.float32)

    def rotate(deg):
        return np.asarray(img.rotate(deg, resample=Image.BILINEAR, fillcolor=float(np.median(gray))), np.float32)

    def lowres(f):
        small = img.resize((max(2, int(w * f)), max(2, int(h * f))), Image.BILINEAR)
        return np.asarray(small, np.float32)

    mean = float(gray.mean())
    out = [
        ("original", gray),
        ("crop 90% centre", crop(0.05, 0.05, 0.95, 0.95)),
        ("crop 80% top-left", crop(0.0, 0.0, 0.8, 0.8)),
        ("downscaled to 1/4", lowres(0.25)),
        ("gamma 0.8", np.power(np.clip(gray, 0, 1), 0.8)),
        ("gamma 1.25", np.power(np.clip(gray, 0, 1), 1.25)),
        ("contrast 0.8 about the mean", mean + 0.8 * (gray - mean)),
        ("rotated +5 deg", rotate(5)),
        ("rotated -5 deg", rotate(-5)),
    ]
    assert tuple(n for n, _ in out) == VARIANTS
    return [(n, resample(np.clip(v, 0, 1).astype(np.float32), spec)) for n, v in out]


def sample_variants(paths, spec: PreprocessSpec) -> tuple[np.ndarray, list[str]]:
    """Each image in `paths` plus 8 deterministic variants -> ((9·n, size, size) float32 0..1, names)."""
    xs, names = [], []
    for p in paths:
        for n, x in _variants(decode(p, min_side=spec.decode_hint()).pixels, spec):
            xs.append(x)
            names.append(f"{Path(p).name}: {n}")
    return np.stack(xs), names


def reference_outputs(net, x01: np.ndarray, spec: PreprocessSpec, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """torch fp32 logits and probabilities (K, classes) float64 on normalise(x01) — x01 must already
    be the uint16-dequantised images (decode_u16(encode(x)))."""
    import torch
    from cxr_edge.postprocess import softmax
    t = np.stack([normalise(x, spec) for x in x01])
    out = []
    with torch.inference_mode():
        for i in range(0, len(t), batch):
            out.append(net(torch.from_numpy(t[i:i + batch])).float().numpy())
    logits = np.concatenate(out).astype(np.float64)
    return logits, softmax(logits)


MIN_MARGIN = 0.1
"""Candidates whose torch fp32 top-2 margin is below this are left out of a reference set: a device
check of top-1 agreement must not be decided by coin flips that any reduced precision may tip
(near-ties are what the `uncertain` flag is for). |Δp| checks lose nothing by it."""


def write_reference_set(pkg, net, x01: np.ndarray, source: str, file: str = FILE, k: int | None = None,
                        min_margin: float = MIN_MARGIN) -> dict:
    """Write `file` into the package directory and set pkg.reference_set (sha256/bytes are filled by
    pkg.write()). x01: (N, size, size) float 0..1 resampled candidate images; those with a torch fp32
    top-2 margin below `min_margin` are dropped, then the first `k` kept (all when k is None).
    When no candidate reaches `min_margin`, all are kept. Returns the record."""
    spec = pkg.preprocess
    if x01.ndim != 3 or x01.shape[1:] != (spec.size, spec.size):
        raise ValueError(f"reference images must be (K, {spec.size}, {spec.size}), got {x01.shape}")
    u16 = encode(x01)
    logits, probs = reference_outputs(net, decode_u16(u16), spec)
    srt = np.sort(probs, 1)
    keep = np.flatnonzero(srt[:, -1] - srt[:, -2] >= min_margin) if probs.shape[1] > 1 else np.arange(len(probs))
    if k is not None:
        keep = keep[:k]
    if not len(keep):  # e.g. an untrained network: nothing is confident, so keep everything (and say so)
        keep = np.arange(len(probs))[:k]
        min_margin = 0.0
        source += "; no candidate had a confident top-1, so none was left out"
    u16, logits, probs = u16[keep], logits[keep], probs[keep]
    if min_margin > 0:
        source += (f"; candidates with a torch fp32 top-2 margin below {min_margin} left out "
                   f"({int(np.sum(srt[:, -1] - srt[:, -2] < min_margin))} of {len(srt)})")
    path = Path(pkg.root) / file
    path.write_bytes(u16.tobytes())
    pkg.reference_set = {"file": file, "sha256": "", "bytes": path.stat().st_size, "shape": list(u16.shape),
                         "scale": SCALE, "source": source,
                         "logits": [[float(v) for v in r] for r in logits.astype(np.float32)],
                         "probabilities": [[float(v) for v in r] for r in probs]}
    return pkg.reference_set
