"""Property-based fuzzing of decode() in the normal test run (hypothesis, small and derandomised:
CXR_FUZZ_EXAMPLES examples per property, default 25). The long, time-bounded run with hang and
crash detection is tests/fuzz_decode.py (CI: --seconds 60). Seeds are generated, never real images.

Property: for ANY bytes, decode either returns a finite float32 H x W image in 0..1, or raises
DecodeError whose message starts with the input's name. Nothing else escapes."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hostile_inputs as H  # noqa: E402
from cxr_edge.decode import DecodeError, decode  # noqa: E402

EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=1)
def _seeds() -> dict:
    return H.seeds()


def _holds(data: bytes):
    try:
        d = decode(data)
    except DecodeError as e:
        assert str(e).startswith("<bytes>: "), str(e)
        return
    p = d.pixels
    assert p.ndim == 2 and p.dtype == np.float32 and p.size > 0
    assert np.isfinite(p).all() and float(p.min()) >= 0 and float(p.max()) <= 1
    assert all(w.startswith("<bytes>: ") for w in d.meta.get("warnings", []))


def test_every_seed_decodes():
    """The seeds themselves are valid inputs of every accepted format (else the fuzzing is blind)."""
    for name, data in _seeds().items():
        d = decode(data)
        assert d.pixels.size > 0, name


@FUZZ
@given(st.binary(max_size=600))
def test_decode_arbitrary_bytes(data):
    _holds(data)


@FUZZ
@given(st.data())
def test_decode_mutated_seeds(data):
    seeds = _seeds()
    name = data.draw(st.sampled_from(sorted(seeds)))
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    _holds(H.mutate(seeds[name], np.random.default_rng(seed)))


@FUZZ
@given(st.data())
def test_decode_dicom_header_mutations(data):
    seeds = _seeds()
    name = data.draw(st.sampled_from(sorted(n for n in seeds if n.startswith("dcm") and "raw" not in n)))
    seed = data.draw(st.integers(0, 2 ** 32 - 1))
    _holds(H.mutate_dicom_header(seeds[name], np.random.default_rng(seed)))
