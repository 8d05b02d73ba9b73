#!/usr/bin/env python3
"""ctest: the cxr-edge-classify sample end to end (PGM in, probabilities out) against the
Python runtime's probabilities for the same pixels, plus its failure exits.

usage: check_sample.py SAMPLE_BINARY VECTORS_DIR
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOLERANCE = 1e-4  # formats.TOLERANCES["fp32"].max_abs_dp: same backend, same precision


def run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def main(sample: str, vectors: str) -> int:
    vec = Path(vectors)
    manifest = json.loads((vec / "vectors.json").read_text())
    expected = manifest["probabilities"]["fp32"]
    classes = manifest["classes"]
    picked = [(i, c) for i, c in enumerate(manifest["cases"]) if "pgm" in c]
    if not picked:
        print("FAIL: vectors contain no PGM cases")
        return 1
    failures = []

    proc = run([sample, "--precision", "fp32", "--json", manifest["package"]] + [str(vec / c["pgm"]) for _, c in picked])
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        print(f"FAIL: sample exited {proc.returncode}")
        return 1
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(lines) != len(picked):
        failures.append(f"{len(lines)} results for {len(picked)} images")
    worst = 0.0
    for (i, case), got in zip(picked, lines):
        want = expected[i]
        dp = max(abs(got["probabilities"][k] - p) for k, p in zip(classes, want))
        worst = max(worst, dp)
        want_label = classes[max(range(len(want)), key=want.__getitem__)]
        if dp > TOLERANCE:
            failures.append(f"{case['name']}: max |dp| {dp:.3g} > {TOLERANCE}")
        if got["label"] != want_label and sorted(want)[-1] - sorted(want)[-2] > 2 * TOLERANCE:
            failures.append(f"{case['name']}: label {got['label']}, Python says {want_label}")
    print(f"sample program: {len(lines)} PGM images, max |dp| vs Python {worst:.3g}")

    # Failures must exit non-zero with a message, not crash.
    bad = run([sample, str(vec / "no-such-package"), str(vec / picked[0][1]["pgm"])])
    if bad.returncode != 1 or "CXR_E_PACKAGE" not in bad.stderr:
        failures.append(f"missing package: exit {bad.returncode}, stderr {bad.stderr.strip()!r}")
    truncated = vec / "truncated.pgm"
    truncated.write_bytes((vec / picked[0][1]["pgm"]).read_bytes()[:500])
    bad = run([sample, manifest["package"], str(truncated)])
    if bad.returncode != 1 or "truncated" not in bad.stderr:
        failures.append(f"truncated PGM: exit {bad.returncode}, stderr {bad.stderr.strip()!r}")
    bad = run([sample])
    if bad.returncode != 2:
        failures.append(f"no arguments: exit {bad.returncode}, expected the usage exit 2")

    for f in failures:
        print("FAIL:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
