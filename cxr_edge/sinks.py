r"""Result sinks for the CLI: CSV, JSONL, a terminal table. Each row is flushed as it arrives so an
interrupted run keeps everything it finished.

Output safety (issue 14):
  * path cells are lossless and readable: the name's bytes decoded as UTF-8, each byte that is not
    UTF-8 written as `\xNN` and (on POSIX) a literal backslash written as `\\` (`path_text`,
    inverted by `path_bytes`). A non-UTF-8 file name therefore never stops a run or loses a row.
    Other text cells (errors, warnings) get the same `\xNN` for undecodable bytes.
  * CSV cells that start with = + - @ TAB or CR (the OWASP "CSV injection" list) get a single quote
    prefixed, so a spreadsheet shows them as text and never evaluates them; a cell that already
    starts with a single quote gets one more, so `csv_value` recovers every cell exactly. JSONL
    holds exact JSON strings (JSON is not evaluated by spreadsheets) with the same path encoding.
"""
from __future__ import annotations

import csv
import io
import json
import os

FORMAT_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# OWASP CSV injection: cells starting with these are formulas to a spreadsheet
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")     # os.listdir's undecodable bytes come back
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")       # other lone surrogates: their UTF-8 bytes


def path_text(path) -> str:
    r"""A file name as a row cell: valid UTF-8 unchanged, other bytes `\xNN`, backslash `\\` (POSIX).

    Lossless (see `path_bytes`) and always encodable, so a non-UTF-8 name never fails a sink.
    """
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    raw = _to_bytes(text)
    if os.sep == "/":
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def path_bytes(cell: str) -> bytes:
    """Inverse of `path_text` on POSIX: the file name's bytes."""
    out, i = bytearray(), 0
    while i < len(cell):
        if cell[i] == "\\" and cell[i + 1:i + 2] == "\\":
            out += b"\\"
            i += 2
        elif cell[i] == "\\" and cell[i + 1:i + 2] == "x":
            out.append(int(cell[i + 2:i + 4], 16))
            i += 4
        else:
            out += cell[i].encode("utf-8")
            i += 1
    return bytes(out)


def safe_text(text):
    r"""Any text cell made encodable: undecodable bytes / lone surrogates as `\xNN`."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _to_bytes(text).decode("utf-8", "backslashreplace")


def csv_cell(value: str) -> str:
    """Neutralise a formula-leading CSV cell (OWASP): prefix a single quote (also to a leading quote)."""
    return "'" + value if value.startswith(FORMULA_START + ("'",)) else value


def csv_value(cell: str) -> str:
    """Inverse of `csv_cell`."""
    return cell[1:] if cell.startswith("'") else cell


def format_for(output: str | None, given: str | None) -> str | None:
    """The sink format: `given` (--format) if set, else from the output's extension.

    Raises:
        ValueError: an output file whose extension names no known format.
    """
    if given or not output:
        return given
    suffix = os.path.splitext(str(output))[1].lower()
    if suffix not in FORMAT_BY_SUFFIX:
        raise ValueError(f"--output {output}: cannot tell the format from the extension {suffix or '(none)'!r}; "
                         f"use {', '.join(FORMAT_BY_SUFFIX)} or pass --format csv|jsonl")
    return FORMAT_BY_SUFFIX[suffix]


def done_paths(output, fmt: str, classes) -> set[str]:
    """Path cells (`path_text` form) already in an earlier output, for --resume. A last line cut
    mid-way by an interrupted run is dropped from the file (its input is classified again).

    Raises:
        ValueError: the file's columns differ from this model's, or a row is unreadable.
    """
    with open(output, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(output, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    text = data.decode("utf-8", "replace")
    done = set()
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if rows and rows[0] != columns(classes):
            raise ValueError(f"--resume {output}: its columns {rows[0]} are not this model's {columns(classes)}; "
                             "resume with the model that wrote it, or write a new file")
        done.update(csv_value(r[0]) for r in rows[1:] if r)
    elif fmt == "jsonl":
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                done.add(obj["path"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"--resume {output}: line {n} is not a result row") from None
    else:
        raise ValueError(f"--resume needs a csv or jsonl output, not {fmt}")
    return done


def columns(classes) -> list[str]:
    """The fields of every result row, CSV and JSONL alike, in order."""
    return ["path", "status", "label", *[f"p_{c}" for c in classes], "backend", "precision", "warnings", "margin",
            "uncertain", "error"]


def _one_line(text: str | None) -> str | None:
    # Decoder messages can span lines; a result row stays one line in every sink (grep, tail -f).
    return " ".join(text.split()) if text else text


def row(r, classes) -> dict:
    """One result as {column: value}: probabilities rounded to 6 decimals, None where not known."""
    d = {"path": path_text(r.source), "status": r.status, "label": r.label if r.ok else None}
    for c in classes:
        d[f"p_{c}"] = round(float(r.probabilities[c]), 6) if r.ok else None
    margin = getattr(r, "margin", None)
    d.update(backend=r.backend, precision=r.precision,
             warnings=_one_line(" | ".join(getattr(r, "warnings", None) or ())) or None,
             margin=round(float(margin), 6) if r.ok and margin is not None else None,
             uncertain=getattr(r, "uncertain", None) if r.ok else None, error=_one_line(r.error))
    return {k: safe_text(v) for k, v in d.items()}


class Sink:
    """Base class of the CLI result sinks: writes one row per `Result` to the text stream `fp`."""
    def __init__(self, fp, classes):
        self.fp, self.classes = fp, classes

    def write(self, r):
        """Write one result row; each subclass flushes after it."""
        raise NotImplementedError

    def close(self):
        """Flush the stream (it is not closed: the caller owns it)."""
        self.fp.flush()


class CsvSink(Sink):
    """CSV rows of `columns(classes)`, with a header unless `header` is False (--resume appends).

    Text cells are neutralised against CSV injection (OWASP) by `csv_cell`.
    """
    def __init__(self, fp, classes, header: bool = True):
        super().__init__(fp, classes)
        self.w = csv.writer(fp)
        if header:              # not when --resume appends to a file that has one
            self.w.writerow(columns(classes))
        fp.flush()

    def write(self, r):
        """Write one result as a CSV row (probabilities and margin to 6 decimals) and flush."""
        d = row(r, self.classes)
        # one write call per row (csv.writer formats the whole line first), then flush: an
        # interrupted run leaves only complete lines behind
        self.w.writerow([f"{v:.6f}" if (k.startswith("p_") or k == "margin") and v is not None
                         else ("" if v is None else str(v).lower() if isinstance(v, bool)
                               else csv_cell(v) if isinstance(v, str) else v)
                         for k, v in d.items()])
        self.fp.flush()


class JsonlSink(Sink):
    """One JSON object per line (`row(r, classes)`); `header` is accepted and ignored."""
    def __init__(self, fp, classes, header: bool = True):
        super().__init__(fp, classes)

    def write(self, r):
        """Write one result as a JSON line and flush."""
        self.fp.write(json.dumps(row(r, self.classes)) + "\n")
        self.fp.flush()


class TableSink(Sink):
    """A fixed-width terminal table, one line per result; uncertain margins are marked `*`."""
    def __init__(self, fp, classes):
        super().__init__(fp, classes)
        self.n_uncertain = 0
        self.fp.write(f"{'status':6} {'label':>10} {'p':>6} {'margin':>7}  " + " ".join(f"{c[:9]:>9}" for c in classes)
                      + "  path\n")

    def write(self, r):
        """Write one result as a table line (an error line shows the message) and flush."""
        if r.ok:
            margin = getattr(r, "margin", None)
            unc = getattr(r, "uncertain", None)
            self.n_uncertain += bool(unc)
            mcell = ("" if margin is None else f"{margin:.3f}") + ("*" if unc else " ")
            self.fp.write(f"{'ok':6} {r.label:>10} {r.probability:6.3f} {mcell:>7}  "
                          + " ".join(f"{r.probabilities[c]:9.3f}" for c in self.classes) + f"  {path_text(r.source)}\n")
        else:
            self.fp.write(f"{'ERROR':6} {'':>10} {'':>6} {'':>7}  " + " ".join(f"{'':>9}" for _ in self.classes)
                          + f"  {safe_text(_one_line(r.error))}\n")
        self.fp.flush()

    def close(self):
        """Write the footnote for uncertain results, if any, then flush."""
        if self.n_uncertain:
            self.fp.write(f"* uncertain ({self.n_uncertain}): top-2 margin below this backend/precision's measured "
                          "near-tie threshold; the reference model may give the runner-up label\n")
        super().close()


SINKS = {"csv": CsvSink, "jsonl": JsonlSink, "table": TableSink}
