"""Result sinks for the CLI: CSV, JSONL, a terminal table. Each row is flushed as it arrives so an
interrupted run keeps everything it finished."""
from __future__ import annotations

import csv
import json
import sys


def columns(classes) -> list[str]:
    """The fields of every result row, CSV and JSONL alike, in order."""
    return ["path", "status", "label", *[f"p_{c}" for c in classes], "backend", "precision", "error"]


def _one_line(text: str | None) -> str | None:
    # Decoder messages can span lines; a result row stays one line in every sink (grep, tail -f).
    return " ".join(text.split()) if text else text


def row(r, classes) -> dict:
    """One result as {column: value}: probabilities rounded to 6 decimals, None where not known."""
    d = {"path": r.source, "status": r.status, "label": r.label if r.ok else None}
    for c in classes:
        d[f"p_{c}"] = round(float(r.probabilities[c]), 6) if r.ok else None
    d.update(backend=r.backend, precision=r.precision, error=_one_line(r.error))
    return d


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
        self.w.writerow(columns(classes))
        fp.flush()

    def write(self, r):
        d = row(r, self.classes)
        # one write call per row (csv.writer formats the whole line first), then flush: an
        # interrupted run leaves only complete lines behind
        self.w.writerow([f"{v:.6f}" if k.startswith("p_") and v is not None else ("" if v is None else v)
                         for k, v in d.items()])
        self.fp.flush()


class JsonlSink(Sink):
    def write(self, r):
        self.fp.write(json.dumps(row(r, self.classes)) + "\n")
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
                          + f"  {_one_line(r.error)}\n")
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
