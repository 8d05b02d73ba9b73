"""train/guard_rates counts the guard's feature warnings, not other warnings."""
import numpy as np
import pytest

pytest.importorskip("torch")
from cxr_edge.train.guard_rates import OOD_MARK, rates  # noqa: E402


def test_rates_count_out_of_distribution_warnings(default_package):
    import cxr_edge
    clf = cxr_edge.load(default_package, backend="torch", precision="fp32", batch_size=4)
    noise = [np.random.default_rng(i).uniform(0, 1, (256, 256)).astype(np.float32) for i in range(4)]
    got = rates(clf, {"noise": noise})
    assert got == {"noise": (4, 4)}       # uniform noise: every one far from every class (REPRODUCTION.md)
    res = clf.predict(noise[:1])
    assert any(OOD_MARK in w for w in res[0].warnings)
