"""export/int8_study.py: the statistics each INT8 variant is scored with."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nncf")
from cxr_edge.export.int8_study import VARIANTS, markdown, score  # noqa: E402
from cxr_edge.formats import wilson_lower_bound  # noqa: E402


def test_score_counts_flips_near_ties_and_sources():
    ref = np.array([[0.9, 0.05, 0.05], [0.5, 0.49, 0.01], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]] * 25)
    probs = ref.copy()
    probs[1] = [0.48, 0.51, 0.01]            # a flip at a near-tie
    probs[2] = [0.1, 0.7, 0.2]               # same label, |dp| 0.1
    src = np.array(["a", "b"] * 50)
    r = score(ref, probs, src)
    assert (r["n"], r["agree"], r["flips"]) == (100, 99, 1)
    assert r["lower_bound"] == pytest.approx(wilson_lower_bound(99, 100))
    assert r["max_abs_dp"] == pytest.approx(0.1)
    assert r["flips_not_uncertain"] == 0 and r["uncertain"] >= 1
    assert r["per_source"] == {"a": [50, 50], "b": [49, 50]}
    r["variant"], r["quantize_seconds"] = VARIANTS["ignored-random300"].__dict__, 1.0
    md = markdown({"x": r}, {"x": {"median_ms": 2.0, "min_ms": 1.5, "max_ms": 2.5}})
    assert "| x | 300 | 100 | 99.00 |" in md and "49/50" in md
