"""Issue 14, output side: CSV/JSONL rows are safe to open in a spreadsheet, lossless for any file
name, never lost; --output refuses to clobber, --resume continues, the format follows the extension.
Runs `cxr-edge classify` in-process on a GENERATED package (tests/test_trust.py) and generated images."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_edge.cli import main
from cxr_edge.sinks import FORMULA_START, csv_cell, csv_value, done_paths, path_bytes, path_text, safe_text

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from test_trust import make_package  # noqa: E402


@pytest.fixture(scope="module")
def pkg(tmp_path_factory) -> Path:
    return make_package(tmp_path_factory.mktemp("gen") / "pkg")


def images(folder: Path, names) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        p = Path(os.fsdecode(os.path.join(os.fsencode(folder), name if isinstance(name, bytes) else name.encode())))
        Image.fromarray(((np.arange(256).reshape(16, 16) * (i + 1)) % 251).astype(np.uint8)).save(p, format="PNG")
        out.append(p)
    return out


def classify(pkg, *args) -> int:
    return main(["classify", *map(str, args), "--model", str(pkg), "--backend", "onnxruntime"])


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


# -- cells -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["=HYPERLINK(\"http://x\",\"y\").png", "+1.png", "-2.png", "@SUM(A1).png",
                                  "\tx.png", "\rx.png", "'quoted.png", "plain.png", ""])
def test_csv_cell_neutralises_and_round_trips(text):
    cell = csv_cell(text)
    assert not cell.startswith(FORMULA_START)
    assert csv_value(cell) == text


def test_path_text_is_lossless_and_readable():
    for raw in [b"plain.png", b"caf\xc3\xa9.png", b"bad\xff\xfe.png", b"back\\slash\\xff.png", b"\\"]:
        name = os.fsdecode(raw)
        cell = path_text(name)
        cell.encode("utf-8")                             # always encodable
        assert path_bytes(cell) == raw
    assert path_text(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
    assert path_text("café.png") == "café.png"
    assert safe_text("x\udcff") == "x\\xff"


# -- classify end to end ---------------------------------------------------------------------------
def test_formula_names_are_neutralised_in_csv_and_exact_in_jsonl(pkg, tmp_path):
    names = ["=HYPERLINK(1).png", "+cmd.png", "-x.png", "@x.png", "ok.png"]
    imgs = images(tmp_path / "in", names)
    (tmp_path / "in" / "=broken.png").write_bytes(b"not an image")          # error row quoting the name
    assert classify(pkg, tmp_path / "in", "-o", tmp_path / "o.csv") == 1
    rows = read_csv(tmp_path / "o.csv")
    assert len(rows) == 1 + len(names) + 1
    for r in rows[1:]:
        for cell in r:
            assert not cell.startswith(FORMULA_START), r
    assert sorted(csv_value(r[0]) for r in rows[1:]) == sorted(str(p) for p in imgs + [tmp_path / "in" / "=broken.png"])
    assert classify(pkg, tmp_path / "in", "-o", tmp_path / "o.jsonl") == 1
    got = [json.loads(line)["path"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert sorted(got) == sorted(str(p) for p in imgs + [tmp_path / "in" / "=broken.png"])


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_non_utf8_file_name_keeps_every_row(pkg, tmp_path, ext):
    names = [f"img{i:02d}.png" for i in range(10)] + [b"bad\xff\xfename.png"]
    images(tmp_path / "in", names)
    out = tmp_path / f"o.{ext}"
    assert classify(pkg, tmp_path / "in", "-o", out) == 0
    if ext == "csv":
        paths = [csv_value(r[0]) for r in read_csv(out)[1:]]
    else:
        paths = [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(paths) == 11
    bad = [p for p in paths if "\\x" in p]
    assert len(bad) == 1 and bad[0].endswith("bad\\xff\\xfename.png")
    assert path_bytes(bad[0]) == os.path.join(os.fsencode(tmp_path / "in"), b"bad\xff\xfename.png")


def test_existing_output_refused_unless_overwrite(pkg, tmp_path, capsys):
    img = images(tmp_path / "in", ["a.png"])[0]
    out = tmp_path / "o.csv"
    out.write_text("precious\n")
    capsys.readouterr()
    assert classify(pkg, img, "-o", out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert out.read_text() == "precious\n"
    assert classify(pkg, img, "-o", out, "--overwrite") == 0
    assert read_csv(out)[1][0] == str(img)
    assert classify(pkg, img, "-o", out, "--overwrite", "--resume") == 2


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_resume_appends_and_skips_done_inputs(pkg, tmp_path, ext, capsys):
    imgs = images(tmp_path / "in", [f"x{i}.png" for i in range(6)] + [b"y\xff.png"])
    out = tmp_path / f"o.{ext}"
    assert classify(pkg, *imgs[:3], "-o", out) == 0
    first = out.read_bytes()
    # an interrupted run can leave half a line: resume drops it and classifies that input again
    with open(out, "ab") as f:
        f.write(b'"' + str(imgs[3]).encode() + b'",ok,nor' if ext == "csv" else b'{"path": "' + str(imgs[3]).encode())
    capsys.readouterr()
    assert classify(pkg, *imgs, "-o", out, "--resume") == 0
    assert "3 of 7 inputs already in" in capsys.readouterr().err
    data = out.read_bytes()
    assert data.startswith(first)                              # earlier rows untouched
    done = done_paths(out, ext, ["covid", "normal", "pneumonia"])
    assert done == {path_text(p) for p in imgs}
    n_rows = len(data.decode().splitlines()) - (1 if ext == "csv" else 0)
    assert n_rows == 7                                         # every input once, no header repeated
    assert classify(pkg, *imgs, "-o", out, "--resume") == 0     # nothing left: still success
    assert out.read_bytes() == data


def test_resume_refuses_a_file_from_another_model(pkg, tmp_path):
    img = images(tmp_path / "in", ["a.png"])[0]
    out = tmp_path / "o.csv"
    out.write_text("path,status,label,p_cat,p_dog,backend,precision,error\n")
    assert classify(pkg, img, "-o", out, "--resume") == 2
    assert classify(pkg, img, "--resume") == 2                 # nothing to resume into


@pytest.mark.parametrize("name,expect", [("o.json", None), ("o.txt", None), ("o", None), ("o.jsonl", "jsonl"),
                                         ("o.ndjson", "jsonl"), ("O.CSV", "csv")])
def test_format_follows_the_extension(pkg, tmp_path, capsys, name, expect):
    img = images(tmp_path / "in", ["a.png"])[0]
    out = tmp_path / name
    capsys.readouterr()
    rc = classify(pkg, img, "-o", out)
    if expect is None:
        assert rc == 2 and not out.exists()
        assert "cannot tell the format from the extension" in capsys.readouterr().err
        assert classify(pkg, img, "-o", out, "--format", "jsonl") == 0          # explicit wins
        assert json.loads(out.read_text())["status"] == "ok"
    else:
        assert rc == 0
        text = out.read_text()
        assert (json.loads(text)["status"] == "ok") if expect == "jsonl" else text.startswith("path,status")


def test_exit_codes_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "--help"])
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "130"):
        assert f"\n  {code}" in out
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "130" in readme
