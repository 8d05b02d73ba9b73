"""Hot paths under pytest-benchmark: decode per format, preprocess, each backend's infer at batch 1
and 8. Not part of the default test run (testpaths = tests); run it explicitly:

    pytest bench/ --benchmark-json out.json [--bench-model PKG] [--benchmark-min-rounds 5]
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")

from cxr_edge.backends import REGISTRY  # noqa: E402
from cxr_edge.decode import decode  # noqa: E402
from cxr_edge.formats import RUN_PRECISIONS, artifact_format  # noqa: E402
from cxr_edge.preprocess import normalise, preprocess, resample  # noqa: E402

FORMATS = ("jpeg", "png8", "png16", "tiff16", "dicom12", "dicom8_real", "dicom_jpeg_real")
COMBOS = [(b, p) for b, precs in RUN_PRECISIONS.items() for p in precs]


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode(benchmark, format_files, bench_package, fmt):
    if fmt not in format_files:
        pytest.skip(f"no {fmt} file here (pydicom or ../shared/data/cxr-dicom missing)")
    path = format_files[fmt]
    hint = bench_package.preprocess.decode_hint()
    benchmark.extra_info.update(format=fmt, file=str(path), min_side=hint)
    d = benchmark(decode, path, min_side=hint)
    assert d.pixels.dtype == np.float32 and d.pixels.ndim == 2


def test_decode_jpeg_full_size(benchmark, format_files):
    """JPEG without draft mode: what draft mode saves."""
    d = benchmark(decode, format_files["jpeg"], min_side=None)
    benchmark.extra_info.update(shape=list(d.pixels.shape))


@pytest.fixture(scope="module")
def decoded(format_files, bench_package):
    return decode(format_files["jpeg"], min_side=bench_package.preprocess.decode_hint())


def test_preprocess(benchmark, decoded, bench_package):
    spec = bench_package.preprocess
    benchmark.extra_info.update(input_shape=list(decoded.pixels.shape), size=spec.size)
    x = benchmark(preprocess, decoded.pixels, spec)
    assert x.shape == (spec.channels, spec.size, spec.size)


def test_preprocess_resample(benchmark, decoded, bench_package):
    benchmark(resample, decoded.pixels, bench_package.preprocess)


def test_preprocess_normalise(benchmark, decoded, bench_package):
    r = resample(decoded.pixels, bench_package.preprocess)
    benchmark(normalise, r, bench_package.preprocess)


_backends = {}


def _backend(pkg, name, prec):
    key = (name, prec)
    if key not in _backends:
        cls = REGISTRY.get(name)
        if cls is None:
            pytest.skip(f"backend {name} not registered")
        ok, why = cls.available()
        if not ok:
            pytest.skip(f"{name}: {why}")
        src = RUN_PRECISIONS[name][prec]
        art = pkg.artifact(src, artifact_format(src).name)
        if art is None:
            pytest.skip(f"package has no {src} artifact")
        try:
            _backends[key] = cls(pkg, art, prec)
        except Exception as e:  # e.g. a precision this CPU lacks: reported as a skip with the reason
            _backends[key] = e
    b = _backends[key]
    if isinstance(b, Exception):
        pytest.skip(f"{name} {prec} does not load here: {b}")
    return b


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend,precision", COMBOS, ids=[f"{b}-{p}" for b, p in COMBOS])
def test_infer(benchmark, bench_package, decoded, backend, precision, batch):
    b = _backend(bench_package, backend, precision)
    x = np.stack([preprocess(decoded.pixels, bench_package.preprocess)] * batch)  # writable, contiguous
    b.infer(x)  # warm-up (first-inference allocations)
    benchmark.extra_info.update(backend=backend, precision=precision, batch=batch, describe=b.describe())
    out = benchmark(b.infer, x)
    assert out["logits"].shape == (batch, len(bench_package.classes))
    benchmark.extra_info["images_per_second"] = batch / benchmark.stats.stats.mean
