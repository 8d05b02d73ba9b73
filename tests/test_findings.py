"""The findings table's statistics: t intervals over seeds, paired differences, shared arms run once."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("scipy")
from cxr_edge.train import findings
from cxr_edge.train.experiment import load_experiment


def _report(path, acc, f1, n=200):
    path.mkdir(parents=True, exist_ok=True)
    per_class = {"a": {"support": n // 4}, "b": {"support": n - n // 4}}
    (path / "report.json").write_text(json.dumps({"test": {"n": n, "accuracy": acc, "macro": {"f1": f1},
                                                           "per_class": per_class}}))


def test_t_interval_matches_the_textbook_formula():
    v = [0.70, 0.74, 0.69]
    m, lo, hi = findings.t_interval(v)
    half = 4.302652729911275 * np.std(v, ddof=1) / np.sqrt(3)    # t(0.975, 2)
    assert m == pytest.approx(np.mean(v)) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    m1, lo1, hi1 = findings.t_interval([0.5])
    assert m1 == 0.5 and np.isnan(lo1) and np.isnan(hi1)


def test_summary_pairs_differences_by_seed(tmp_path):
    comp = findings.Comparison("c", "title", "claim", (("A", "exp_a"), ("B", "exp_b")), "testable")
    accs_a, accs_b = [0.60, 0.70, 0.65], [0.66, 0.75, 0.72]
    for s, (a, b) in enumerate(zip(accs_a, accs_b)):
        _report(findings.run_dir(tmp_path, "exp_a", s, "t"), a, a - 0.1)
        _report(findings.run_dir(tmp_path, "exp_b", s, "t"), b, b - 0.1)
    out = findings.summarise(tmp_path, [comp], [0, 1, 2], "t")["c"]
    a, b = out["arms"]
    assert a["seeds"] == [0, 1, 2] and "diff_ci" not in a["accuracy"]
    d = np.subtract(accs_b, accs_a)
    assert b["accuracy"]["diff_ci"] == pytest.approx(findings.t_interval(d))
    # paired, not unpaired: the seed-to-seed spread cancels, so the paired interval is the narrower one
    paired = b["accuracy"]["diff_ci"][2] - b["accuracy"]["diff_ci"][1]
    unpaired_half = [findings.t_interval(accs_a), findings.t_interval(accs_b)]
    assert paired < sum(h - lo for _, lo, h in unpaired_half)
    md = findings.markdown({"c": out}, "settings")
    assert "| B | `exp_b` | 3 | 200 | 75.0 |" in md and "What this can test: testable" in md


def test_intervals_are_clipped_to_the_metric_range():
    assert findings._pct_ci((0.9, 0.4, 1.1)) == "90.0 [40.0, 100.0]"
    assert findings._pct_ci((-0.5, -1.3, 0.2), -1.0) == "-50.0 [-100.0, 20.0]"


def test_a_missing_seed_is_left_out_of_the_pairing(tmp_path):
    comp = findings.Comparison("c", "t", "c", (("A", "exp_a"), ("B", "exp_b")), "x")
    for s in (0, 1, 2):
        _report(findings.run_dir(tmp_path, "exp_a", s, "t"), 0.5 + s / 10, 0.4)
    for s in (0, 2):
        _report(findings.run_dir(tmp_path, "exp_b", s, "t"), 0.6 + s / 10, 0.4)
    b = findings.summarise(tmp_path, [comp], [0, 1, 2], "t")["c"]["arms"][1]
    assert b["seeds"] == [0, 2]
    assert b["accuracy"]["diff_ci"][0] == pytest.approx(0.1)


def test_shared_arms_run_once_and_finished_runs_are_skipped(tmp_path):
    plan = findings.planned(findings.COMPARISONS, [0, 1, 2])
    assert len(plan) == len(set(plan))
    assert sum(e == "sun_densenet121_raw_3ch" for e, _ in plan) == 3     # in two comparisons, run once per seed
    tag = findings.settings_tag(64, 8, 1)
    for exp, s in plan:
        _report(findings.run_dir(tmp_path, exp, s, tag), 0.5, 0.4)
    logged = []
    args = SimpleNamespace(out=str(tmp_path), seeds=[0, 1, 2], threads=1, parallel=2, data="unused",
                           size=64, limit=8, epochs=1)
    assert findings.run_all(args, findings.COMPARISONS, log=logged.append) == 0
    assert logged == []      # every report exists: nothing is trained again
    # other settings are another table: none of those reports counts for it
    other = findings.summarise(tmp_path, findings.COMPARISONS, [0, 1, 2], findings.settings_tag(64, 8, 2))
    assert all(a["seeds"] == [] for c in other.values() for a in c["arms"])


def test_arms_of_a_comparison_share_their_data_configuration():
    """Paired by seed is only fair when the arms share the data configuration (hence the split)."""
    for c in findings.COMPARISONS:
        data = [load_experiment(exp)["data"] for _, exp in c.arms]
        assert all(d == data[0] for d in data), c.key


def test_overrides_train_every_layer_from_random_init(tmp_path):
    """A transfer recipe that freezes early layers would freeze random weights in a from-scratch run."""
    for exp in findings.OVERRIDES:
        cfg = json.loads(open(findings.experiment_file(tmp_path, exp)).read())
        assert cfg["name"] == exp and all(ph["trainable"] == "all" for ph in cfg["phases"])
    assert findings.experiment_file(tmp_path, "yang_logreg") == "yang_logreg"


def test_missing_data_folder_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        findings.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
