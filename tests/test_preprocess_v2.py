"""Preprocessing v2 option `reducing_gap` (PreprocessSpec): Pillow's integer box pre-reduction
before the antialiased bilinear resample. Absent, the v1 path is untouched."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from cxr_edge.preprocess import PreprocessSpec, preprocess, resample, resize_box


def explicit_reduce_then_resample(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """What reducing_gap means, spelled out (the C SDK implements these steps)."""
    h, w = gray.shape
    size, box = resize_box(h, w, spec)
    fx = int((box[2] - box[0]) / size[0] / spec.reducing_gap) or 1
    fy = int((box[3] - box[1]) / size[1] / spec.reducing_gap) or 1
    if fx == 1 and fy == 1:
        src, nb = gray, box
    else:
        sx, sy = 0.5 * (box[2] - box[0]) / size[0], 0.5 * (box[3] - box[1]) / size[1]
        rb = (max(0, int(box[0] - sx)), max(0, int(box[1] - sy)),
              min(w, math.ceil(box[2] + sx)), min(h, math.ceil(box[3] + sy)))
        rw, rh = (rb[2] - rb[0] + fx - 1) // fx, (rb[3] - rb[1] + fy - 1) // fy
        src = np.zeros((rh, rw), np.float32)
        for y in range(rh):
            for x in range(rw):
                blk = gray[rb[1] + y * fy:min(rb[1] + (y + 1) * fy, rb[3]), rb[0] + x * fx:min(rb[0] + (x + 1) * fx, rb[2])]
                src[y, x] = blk.astype(np.float64).mean()
        nb = ((box[0] - rb[0]) / fx, (box[1] - rb[1]) / fy, (box[2] - rb[0]) / fx, (box[3] - rb[1]) / fy)
    return np.asarray(Image.fromarray(src, mode="F").resize(size, Image.BILINEAR, box=nb), np.float32)


SPECS = [dict(size=32, channels=1, mean=(0.0,), std=(1.0,), reducing_gap=2.0),
         dict(size=24, resize="shorter_side_crop", resize_size=30, channels=1, mean=(0.0,), std=(1.0,), reducing_gap=1.5),
         dict(size=20, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3, reducing_gap=3)]


@pytest.mark.parametrize("shape", [(301, 257), (97, 130), (900, 41), (20, 20)])
@pytest.mark.parametrize("k", range(len(SPECS)))
def test_reducing_gap_is_box_average_then_bilinear(shape, k):
    gray = np.random.default_rng(k).random(shape).astype(np.float32)
    spec = PreprocessSpec(**SPECS[k])
    got = resample(gray, spec)
    assert np.abs(got - explicit_reduce_then_resample(gray, spec)).max() <= 1e-6
    if min(shape) > 4 * spec.size:  # a real pre-reduction happened: not the v1 result
        assert np.abs(got - resample(gray, PreprocessSpec(**{**SPECS[k], "reducing_gap": None}))).max() > 1e-4


def test_v1_spec_unchanged_and_serialised_without_the_key():
    spec = PreprocessSpec(size=40, channels=1, mean=(0.0,), std=(1.0,))
    assert "reducing_gap" not in spec.to_dict()
    gray = np.random.default_rng(1).random((333, 250)).astype(np.float32)
    img = Image.fromarray(gray, mode="F")
    ref = np.asarray(img.resize((40, 40), Image.BILINEAR, box=(0.0, 0.0, 250.0, 333.0)), np.float32)
    assert np.array_equal(resample(gray, spec), ref)


def test_v2_round_trip_and_validation():
    spec = PreprocessSpec(size=64, reducing_gap=2)
    d = spec.to_dict()
    assert d["reducing_gap"] == 2.0
    assert PreprocessSpec.from_dict(d) == spec
    assert preprocess(np.zeros((300, 200), np.float32), spec).shape == (3, 64, 64)
    for bad in (0.5, 0, -1, 100, "2", True):
        with pytest.raises(ValueError, match="reducing_gap"):
            PreprocessSpec(size=64, reducing_gap=bad)
