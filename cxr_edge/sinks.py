"""Result sinks for the CLI: CSV, JSONL, a terminal table. Each row is flushed as it arrives so an
interrupted run keeps everything it finished."""
from __future__ import annotations

import csv
import json
import sys


class Sink:
    def __init__(self, fp, classes):
        self.fp, self.classes = fp, classes

    def write(self, r):
        raise NotImplementedError

    def close(self):
        self.fp.flush()


class CsvSink(Sink):
    def __init__(self, fp, classes):
        super().__init__(fp, classes)
        self.w = csv.writer(fp)
        self.w.writerow(["path", "status", "label", *[f"p_{c}" for c in classes], "backend", "precision", "error"])
        fp.flush()

    def write(self, r):
        probs = [f"{r.probabilities[c]:.6f}" if r.ok else "" for c in self.classes]
        self.w.writerow([r.source, r.status, r.label or "", *probs, r.backend, r.precision, r.error or ""])
        self.fp.flush()


class JsonlSink(Sink):
    def write(self, r):
        d = r.to_dict()
        d["probabilities"] = {c: round(v, 6) for c, v in d["probabilities"].items()}
        self.fp.write(json.dumps(d) + "\n")
        self.fp.flush()


class TableSink(Sink):
    def __init__(self, fp, classes):
        super().__init__(fp, classes)
        self.fp.write(f"{'status':6} {'label':>10} {'p':>6}  " + " ".join(f"{c[:9]:>9}" for c in classes) + "  path\n")

    def write(self, r):
        if r.ok:
            self.fp.write(f"{'ok':6} {r.label:>10} {r.probability:6.3f}  "
                          + " ".join(f"{r.probabilities[c]:9.3f}" for c in self.classes) + f"  {r.source}\n")
        else:
            self.fp.write(f"{'ERROR':6} {'':>10} {'':>6}  " + " ".join(f"{'':>9}" for _ in self.classes)
                          + f"  {r.error}\n")
        self.fp.flush()


SINKS = {"csv": CsvSink, "jsonl": JsonlSink, "table": TableSink}


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""
    def __init__(self, total: int | None, enabled: bool | None = None):
        self.total, self.n, self.failed = total, 0, 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def update(self, ok: bool):
        self.n += 1
        self.failed += 0 if ok else 1
        if self.enabled:
            tot = self.total or 0
            frac = self.n / tot if tot else 0
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r[{bar:<30}] {self.n}/{tot} ({self.failed} failed)")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")
