"""`cxr-edge classify` / `cxr-edge info` as an operator runs them: real subprocesses on real and
broken files. Every bad input is its own error row; good files in the same run are classified;
nothing prints a traceback."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from cxr_edge.cli import expand_inputs, main
from cxr_edge.package import MODEL_JSON

from conftest import CXR_DICOM, sample_images

CLASSES = ["covid", "normal", "pneumonia"]
HEADER = ["path", "status", "label", *[f"p_{c}" for c in CLASSES], "backend", "precision", "warnings", "margin",
          "uncertain", "error"]
CLI = [sys.executable, "-m", "cxr_edge.cli"]


def _png_bomb(side: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _dicom(path: Path, arr: np.ndarray, modality: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = modality
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1" if modality == "DX" else "1.2.840.10008.5.1.4.1.1.2"
    ds.set_pixel_data(arr, "MONOCHROME2", 8)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


# expected error rows: file name -> what the error must say
BAD = {
    "empty.jpeg": "empty file (0 bytes)",
    "truncated.jpeg": "corrupt or truncated image",
    "notes.png": "not a recognised image file",
    "bomb.png": "decompression-bomb limit",
    "ct.dcm": "modality CT is not a radiograph",
    "cine.dcm": "multi-frame DICOM (3 frames)",
    "missing.png": "file not found",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with good radiographs (JPEG, PNG, DICOM without extension) and every kind of broken file."""
    pytest.importorskip("pydicom")
    from PIL import Image
    d = tmp_path_factory.mktemp("inbox")
    good = []
    for p in sample_images()[:3]:
        shutil.copy(p, d / p.name)
        good.append(d / p.name)
    with Image.open(sample_images()[9]) as im:
        arr = np.asarray(im.convert("L").resize((300, 200), Image.BILINEAR))
    Image.fromarray(arr.astype(np.uint16) * 257).save(d / "png16.png")      # a 16-bit PNG
    good.append(d / "png16.png")
    _dicom(d / "IM0001", arr, "DX")                          # DICOM files often carry no extension
    good.append(d / "IM0001")
    (d / "empty.jpeg").write_bytes(b"")
    (d / "truncated.jpeg").write_bytes(sample_images()[5].read_bytes()[:15000])
    (d / "notes.png").write_text("patient list, not an image\n" * 50)
    (d / "bomb.png").write_bytes(_png_bomb(60000))
    real_ct = CXR_DICOM / "files" / "udacity_test5.dcm"       # a real file whose header says CT
    if real_ct.is_file():
        shutil.copy(real_ct, d / "ct.dcm")
    else:
        _dicom(d / "ct.dcm", arr, "CT")
    _dicom(d / "cine.dcm", np.stack([arr] * 3), "DX")
    (d / "readme.txt").write_text("not an image suffix: skipped by the folder scan")
    (d / ".hidden.png").write_bytes(b"skipped too")
    return {"dir": d, "good": [str(p) for p in good], "missing": str(d / "gone" / "missing.png")}


def run_cli(args, **kw):
    return subprocess.Popen(CLI + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def finish(proc, timeout=900):   # generous: a loaded 2-core machine is slow to start torch
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def broken_package(tiny_package, dst: Path) -> Path:
    dst.mkdir()
    for f in tiny_package.iterdir():
        if f.name != MODEL_JSON:
            (dst / f.name).symlink_to(f)
    (dst / MODEL_JSON).write_text((tiny_package / MODEL_JSON).read_text()[:300])
    return dst


@pytest.fixture(scope="module")
def runs(tiny_package, inputs, tmp_path_factory):
    """The CLI runs, started together (each process spends most of its time importing and loading)."""
    out = tmp_path_factory.mktemp("out")
    bad_pkg = broken_package(tiny_package, out / "broken.cxrpkg")
    procs = {
        "csv": run_cli(["classify", inputs["dir"], inputs["missing"], "--model", tiny_package,
                        "--output", out / "out.csv"]),
        "jsonl": run_cli(["classify", *inputs["good"][:2], inputs["dir"] / "ct.dcm", inputs["dir"] / "notes.png",
                          inputs["missing"], "--model", tiny_package, "--output", out / "out.jsonl",
                          "--batch-size", "3"]),
        "corrupt_model": run_cli(["classify", inputs["dir"], "--model", bad_pkg, "--output", out / "never.csv"]),
    }
    done = {k: finish(p) for k, p in procs.items()}
    return {"out": out, **done}


def _no_traceback(err: str):
    assert "Traceback" not in err and "Error:" not in err.replace("error:", ""), err


def test_csv_rows_for_good_and_bad_files(runs, inputs):
    rc, _, err = runs["csv"]
    assert rc == 1, err                               # some inputs failed: exit 1, after classifying the rest
    _no_traceback(err)
    assert "Research software" in err and "failed" in err
    with open(runs["out"] / "out.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == HEADER
    by_name = {Path(r[0]).name: dict(zip(HEADER, r)) for r in rows[1:]}
    assert len(rows) - 1 == len(inputs["good"]) + len(BAD) == len(by_name)
    assert "readme.txt" not in by_name and ".hidden.png" not in by_name
    for g in inputs["good"]:
        r = by_name[Path(g).name]
        assert r["status"] == "ok" and r["error"] == "", r
        assert r["label"] in CLASSES
        p = [float(r[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(p) - 1) < 1e-5 and r["label"] == CLASSES[int(np.argmax(p))]
        assert r["backend"] and r["precision"]
    for name, cause in BAD.items():
        r = by_name[name]
        assert r["status"] == "error" and r["label"] == "" and all(r[f"p_{c}"] == "" for c in CLASSES), r
        assert name in r["error"] and cause in r["error"], (name, r["error"])
        assert "\n" not in r["error"]
    assert f"{len(inputs['good'])} classified, {len(BAD)} failed" in err


def test_jsonl_has_the_csv_fields(runs, inputs):
    rc, _, err = runs["jsonl"]
    assert rc == 1, err
    _no_traceback(err)
    lines = (runs["out"] / "out.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(list(r) == HEADER for r in rows)                   # same fields, same order as the CSV
    with open(runs["out"] / "out.csv", newline="", encoding="utf-8") as f:
        csv_rows = {r["path"]: r for r in csv.DictReader(f)}
    assert len(rows) == 5 and {r["path"] for r in rows} <= set(csv_rows)
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error", "error"]
    for r in rows:
        c = csv_rows[r["path"]]
        assert r["status"] == c["status"]
        if r["status"] == "ok":
            assert r["label"] == c["label"] and r["error"] is None
            assert all(isinstance(r[f"p_{k}"], float) for k in CLASSES)
            if r["backend"] == c["backend"] and r["precision"] == c["precision"]:
                assert all(abs(r[f"p_{k}"] - float(c[f"p_{k}"])) <= 1.5e-6 for k in CLASSES)
        else:
            assert r["label"] is None and all(r[f"p_{k}"] is None for k in CLASSES)
            assert r["error"] == c["error"]


def test_corrupt_model_exits_2(runs):
    rc, out, err = runs["corrupt_model"]
    assert rc == 2, err
    _no_traceback(err)
    assert "not valid JSON" in err and out == ""
    assert not (runs["out"] / "never.csv").exists()     # nothing written before the model loads


def test_model_errors_in_process(tiny_package, tmp_path, capsys):
    sample = str(sample_images()[0])
    assert main(["classify", sample, "--model", str(tmp_path / "nope.cxrpkg"), "-o", str(tmp_path / "o.csv")]) == 2
    assert "model package directory not found" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
    bad = broken_package(tiny_package, tmp_path / "bad.cxrpkg")
    assert main(["info", "--model", str(bad), "--json"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "emptydir").mkdir()
    assert main(["classify", str(tmp_path / "emptydir"), "--model", str(tiny_package)]) == 2
    assert "no input images found" in capsys.readouterr().err
    assert main(["classify", sample, "--model", str(tiny_package), "--backend", "onnxruntime",
                 "--precision", "bf16"]) == 2
    assert "no usable backend" in capsys.readouterr().err
    assert main(["classify", sample, "--model", str(tiny_package), "-o", str(tmp_path / "no" / "dir" / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "does not exist" in err


def test_expand_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.PNG", "a.jpeg", "IM0001", "notes.txt", ".hidden.png", "sub/c.dcm"):
        (tmp_path / name).write_bytes(b"x")
    names = [Path(p).relative_to(tmp_path).as_posix() for p in expand_inputs([str(tmp_path)], recursive=False)]
    assert names == ["IM0001", "a.jpeg", "b.PNG"]
    rec = [Path(p).relative_to(tmp_path).as_posix() for p in expand_inputs([str(tmp_path)], recursive=True)]
    assert rec == ["IM0001", "a.jpeg", "b.PNG", "sub/c.dcm"]
    # a file named explicitly is kept whatever its name, and so is a path that does not exist
    assert expand_inputs([str(tmp_path / "notes.txt"), "/no/such.png"], False) == [str(tmp_path / "notes.txt"), "/no/such.png"]


def test_sigint_keeps_complete_rows(tiny_package, tmp_path):
    inbox = tmp_path / "many"
    inbox.mkdir()
    samples = sample_images()
    for i in range(30):
        for s in samples:
            (inbox / f"{i:02d}_{s.name}").symlink_to(s)
    total = 30 * len(samples)
    out = tmp_path / "out.csv"
    # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT: give the
    # child the default disposition, so the test does not depend on how pytest was started
    proc = run_cli(["classify", inbox, "--model", tiny_package, "--backend", "onnxruntime", "--batch-size", "4",
                    "--output", out], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if out.is_file() and out.read_text().count("\n") >= 6:     # header + 5 rows written
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted: " + proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc, timeout=600)
    assert rc == 130, err
    _no_traceback(err)
    assert "interrupted after" in err and "rows written so far are kept" in err
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n")                                     # no half-written last line
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == HEADER
    done = rows[1:]
    assert 5 <= len(done) < total
    expected = sorted(str(p) for p in inbox.iterdir())
    assert [r[0] for r in done] == expected[:len(done)]           # in input order, none skipped
    for r in done:
        assert len(r) == len(HEADER) and r[1] == "ok" and r[2] in CLASSES and r[-1] == "", r
        assert abs(sum(float(x) for x in r[3:6]) - 1) < 1e-5


def _info(capsys, pkg) -> dict:
    assert main(["info", "--model", str(pkg), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_json(tiny_package, capsys):
    from cxr_edge.backends import backend_status
    info = _info(capsys, tiny_package)
    assert set(info["backends"]) == {"tensorrt", "openvino", "onnxruntime", "torch"}
    status = backend_status()
    for name, b in info["backends"].items():
        assert b["available"] is status[name][0] and b["reason"] == status[name][1]
        assert isinstance(b["usable"], list) and isinstance(b["skipped"], list)
        if not b["available"]:
            assert b["usable"] == []
    auto = info["auto"]
    assert auto and info["backends"][auto["backend"]]["available"]
    assert auto["precision"] in info["backends"][auto["backend"]]["usable"]
    assert info["ranked"][0] == f"{auto['backend']}/{auto['precision']}"
    assert auto["artifact"] in {a["file"] for a in info["model"]["artifacts"]}
    assert "passed its parity gate" in auto["reason"] or "reference" in auto["reason"]
    assert info["model"]["classes"] == CLASSES
    # the same through the text output
    assert main(["info", "--model", str(tiny_package)]) == 0
    text = capsys.readouterr().out
    assert f"auto     {auto['backend']} {auto['precision']}" in text


def test_failed_gates_make_auto_refuse_a_backend(tiny_package, tmp_path, capsys):
    import cxr_edge
    from cxr_edge.backends.base import BackendError
    info = _info(capsys, tiny_package)
    victim = info["auto"]["backend"]
    if victim == "torch":
        pytest.skip("only the torch reference is usable here")
    pkg = tmp_path / "failed.cxrpkg"
    pkg.mkdir()
    for f in tiny_package.iterdir():
        if f.name != MODEL_JSON:
            os.link(f, pkg / f.name)      # a hard link: a symlink leaving the package is refused
    meta = json.loads((tiny_package / MODEL_JSON).read_text())
    for a in meta["artifacts"]:                   # every artifact failed its gate on that backend
        for key, gate in a["gate"].items():
            if key.startswith(victim + "/"):
                gate["passed"] = False
    (pkg / MODEL_JSON).write_text(json.dumps(meta))    # gates are not checksummed: no sha to redo
    info2 = _info(capsys, pkg)
    assert info2["auto"]["backend"] != victim
    assert info2["backends"][victim]["available"] is True and info2["backends"][victim]["usable"] == []
    assert any("did not pass its parity gate" in s for s in info2["backends"][victim]["skipped"])
    assert all(not r.startswith(victim + "/") for r in info2["ranked"])
    with pytest.raises(BackendError, match="did not pass its parity gate"):
        cxr_edge.load(pkg, backend=victim)
    clf = cxr_edge.load(pkg)
    try:
        assert clf.backend_name == info2["auto"]["backend"]
    finally:
        clf.close()
