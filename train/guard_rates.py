"""The input guard's rates through the runtime, for one backend and precision of a package.

    python -m cxr_edge.train.guard_rates --split RUN/split.json [--data ../shared/data/cxr]
        [--model PACKAGE] [--backend openvino] [--precision int8]

Runs `cxr_edge.load(...).predict` on the split's test frontals (false alarms), the lateral views of
the data folder's manifest (caught) and the generated non-radiographs of train/calibrate.py
(caught), and counts results carrying the guard's out-of-distribution warning. A reduced precision
changes the features the guard scores: a package may carry a guard fitted on that precision's
features (train/calibrate.py precision), which the runtime then uses; rates are measured per precision.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

OOD_MARK = "out-of-distribution score"     # in every warning cxr_edge.guard gives from features


def rates(clf, sets: dict) -> dict:
    """{set name: (warned, n)} for lists of inputs (paths or arrays)."""
    out = {}
    for name, items in sets.items():
        res = clf.predict(items)
        out[name] = (sum(any(OOD_MARK in w for w in (r.warnings or [])) for r in res), len(res))
    return out


def main(argv=None) -> int:
    import cxr_edge
    from .calibrate import synthetic_set
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.train.guard_rates", description=__doc__.splitlines()[0])
    ap.add_argument("--split", required=True, help="RUN/split.json (its test part gives the frontals)")
    ap.add_argument("--data", default="../shared/data/cxr", help="folder with manifest.csv (its laterals)")
    ap.add_argument("--model", help="package (default: the embedded default model)")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--precision", default="int8")
    a = ap.parse_args(argv)
    data = Path(a.data)
    if not (data / "manifest.csv").is_file():
        ap.error(f"--data {data}: no manifest.csv there")
    test = [r["path"] for r in json.loads(Path(a.split).read_text())["test"]]
    with open(data / "manifest.csv", newline="") as f:
        laterals = [str(data / r["path"]) for r in csv.DictReader(f) if r.get("view") == "L"]
    clf = cxr_edge.load(a.model, backend=a.backend, precision=a.precision, batch_size=8)
    print(clf.backend.describe())
    got = rates(clf, {"test frontals (false alarms)": test, "lateral views (caught)": laterals,
                      "generated non-radiographs (caught)": [x for _, x in synthetic_set()]})
    for name, (k, n) in got.items():
        print(f"{name}: {k}/{n} = {100 * k / max(n, 1):.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
