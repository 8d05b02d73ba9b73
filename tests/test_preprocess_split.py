"""One large image resampled on several threads (preprocess.resample(threads=N), used by
Classifier.predict_one) gives bit-identical values to the one-call Pillow resample."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_edge.preprocess import SPLIT_MIN_PIXELS, PreprocessSpec, preprocess, resample

SPECS = [PreprocessSpec(size=128, mean=(0.5,) * 3, std=(0.25,) * 3),          # the default package's
         PreprocessSpec(size=299, channels=1, mean=(0.5,), std=(0.25,)),      # scale not a power of two
         PreprocessSpec(size=224, resize="shorter_side_crop", resize_size=256),
         PreprocessSpec(size=100, resize="shorter_side_crop", resize_size=300, channels=1, mean=(0.4,), std=(0.2,))]


@pytest.mark.parametrize("shape", [(2500, 2048), (2048, 2500), (2431, 1999), (1024, 2048)])
@pytest.mark.parametrize("k", range(len(SPECS)))
def test_split_resample_is_bit_identical(shape, k):
    gray = np.random.default_rng(k).random(shape, dtype=np.float32)
    assert gray.size >= SPLIT_MIN_PIXELS
    whole = resample(gray, SPECS[k])
    for threads in (2, 3):
        split = resample(gray, SPECS[k], threads)
        assert split.dtype == np.float32 and split.shape == whole.shape
        assert np.array_equal(split, whole), (threads, float(np.abs(split - whole).max()))
    assert np.array_equal(preprocess(gray, SPECS[k], threads=2), preprocess(gray, SPECS[k]))


def test_small_images_and_v2_specs_take_the_one_call_path():
    small = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    spec = SPECS[0]
    assert np.array_equal(resample(small, spec, 4), resample(small, spec))
    v2 = PreprocessSpec(size=128, mean=(0.5,) * 3, std=(0.25,) * 3, reducing_gap=2.0)
    big = np.random.default_rng(1).random((2500, 2048), dtype=np.float32)
    assert np.array_equal(resample(big, v2, 2), resample(big, v2))
