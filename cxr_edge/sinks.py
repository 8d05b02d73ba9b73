"""Result sinks for the CLI: CSV, JSONL, a terminal table. Each row is flushed as it arrives so an
interrupted run keeps everything it finished."""
from __future__ import annotations

import csv
import json


def columns(classes) -> list[str]:
    """The fields of every result row, CSV and JSONL alike, in order."""
    return ["path", "status", "label", *[f"p_{c}" for c in classes], "backend", "precision", "margin", "uncertain",
            "error"]


def _one_line(text: str | None) -> str | None:
    # Decoder messages can span lines; a result row stays one line in every sink (grep, tail -f).
    return " ".join(text.split()) if text else text


def row(r, classes) -> dict:
    """One result as {column: value}: probabilities rounded to 6 decimals, None where not known."""
    d = {"path": r.source, "status": r.status, "label": r.label if r.ok else None}
    for c in classes:
        d[f"p_{c}"] = round(float(r.probabilities[c]), 6) if r.ok else None
    margin = getattr(r, "margin", None)
    d.update(backend=r.backend, precision=r.precision,
             margin=round(float(margin), 6) if r.ok and margin is not None else None,
             uncertain=getattr(r, "uncertain", None) if r.ok else None, error=_one_line(r.error))
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
        self.w.writerow([f"{v:.6f}" if (k.startswith("p_") or k == "margin") and v is not None
                         else ("" if v is None else str(v).lower() if isinstance(v, bool) else v)
                         for k, v in d.items()])
        self.fp.flush()


class JsonlSink(Sink):
    def write(self, r):
        self.fp.write(json.dumps(row(r, self.classes)) + "\n")
        self.fp.flush()


class TableSink(Sink):
    def __init__(self, fp, classes):
        super().__init__(fp, classes)
        self.n_uncertain = 0
        self.fp.write(f"{'status':6} {'label':>10} {'p':>6} {'margin':>7}  " + " ".join(f"{c[:9]:>9}" for c in classes)
                      + "  path\n")

    def write(self, r):
        if r.ok:
            margin = getattr(r, "margin", None)
            unc = getattr(r, "uncertain", None)
            self.n_uncertain += bool(unc)
            mcell = ("" if margin is None else f"{margin:.3f}") + ("*" if unc else " ")
            self.fp.write(f"{'ok':6} {r.label:>10} {r.probability:6.3f} {mcell:>7}  "
                          + " ".join(f"{r.probabilities[c]:9.3f}" for c in self.classes) + f"  {r.source}\n")
        else:
            self.fp.write(f"{'ERROR':6} {'':>10} {'':>6} {'':>7}  " + " ".join(f"{'':>9}" for _ in self.classes)
                          + f"  {_one_line(r.error)}\n")
        self.fp.flush()

    def close(self):
        if self.n_uncertain:
            self.fp.write(f"* uncertain ({self.n_uncertain}): top-2 margin below this backend/precision's measured "
                          "near-tie threshold; the reference model may give the runner-up label\n")
        super().close()


SINKS = {"csv": CsvSink, "jsonl": JsonlSink, "table": TableSink}
