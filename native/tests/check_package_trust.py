#!/usr/bin/env python3
"""ctest: the C SDK's package reader against the JSON Schema of model.json and the Python reader.

For the test package and for variants of it (malformed fields, wrong checksums, a flipped byte, a
symlink leaving the package, an unlisted weights file, ONNX external data, deep nesting), checks:
  * the schema (cxr_edge/schema/model.schema.json, by `jsonschema` when installed, else cxr_edge's
    own validator) accepts the test package's model.json and rejects each malformed variant;
  * cxr_open (libcxr_edge through ctypes) refuses every broken variant with CXR_E_PACKAGE and a
    message naming the problem, and so does cxr_edge.package.ModelPackage.read.

usage: check_package_trust.py LIBCXR_EDGE VECTORS_DIR SCRATCH_DIR
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
from pathlib import Path

from cxr_edge.package import MODEL_JSON, ModelPackage, PackageError, schema, schema_error

CXR_OK, CXR_E_PACKAGE = 0, 2


def schema_invalid(meta) -> bool:
    try:
        import jsonschema
    except ImportError:
        return schema_error(meta) is not None
    return bool(list(jsonschema.Draft202012Validator(schema()).iter_errors(meta)))


def place(src: Path, dst: Path):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def variant(pkg: Path, scratch: Path, name: str, edit=None, copy=()) -> Path:
    meta = json.loads((pkg / MODEL_JSON).read_text())
    d = scratch / name
    d.mkdir(parents=True)
    files = [a["file"] for a in meta["artifacts"]] + [c["file"] for a in meta["artifacts"] for c in a.get("companions", [])]
    if meta.get("reference_set"):
        files.append(meta["reference_set"]["file"])
    for f in files:
        (shutil.copy2 if f in copy else place)(pkg / f, d / f)
    if edit:
        edit(meta)
    (d / MODEL_JSON).write_text(json.dumps(meta))
    return d


def flip_last_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def external_data_package(pkg: Path, scratch: Path) -> Path:
    """The test package with its fp32 ONNX re-saved keeping the weights in an external file."""
    import onnx
    from cxr_edge.package import sha256_file
    d = variant(pkg, scratch, "external-data")
    meta = json.loads((d / MODEL_JSON).read_text())
    a = meta["artifacts"][0]
    model = onnx.load(str(pkg / a["file"]))
    (d / a["file"]).unlink()
    onnx.save(model, str(d / a["file"]), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights", size_threshold=0)
    a["sha256"], a["bytes"] = sha256_file(d / a["file"]), (d / a["file"]).stat().st_size
    (d / MODEL_JSON).write_text(json.dumps(meta))
    return d


def main(lib_path: str, vectors: str, scratch_dir: str) -> int:
    lib = ctypes.CDLL(lib_path)
    lib.cxr_open.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.cxr_open.restype = ctypes.c_int
    lib.cxr_last_error.restype = ctypes.c_char_p
    lib.cxr_close.argtypes = [ctypes.c_void_p]

    def c_open(d: Path):
        m = ctypes.c_void_p()
        st = lib.cxr_open(str(d).encode(), None, ctypes.byref(m))
        msg = lib.cxr_last_error().decode("utf-8", "replace")
        if st == CXR_OK:
            lib.cxr_close(m)
        return st, msg

    pkg = Path(json.loads((Path(vectors) / "vectors.json").read_text())["package"])
    scratch = Path(scratch_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    failures = []

    meta = json.loads((pkg / MODEL_JSON).read_text())
    if schema_invalid(meta):
        failures.append(f"the test package's model.json does not validate against the schema: {schema_error(meta)}")
    st, msg = c_open(pkg)
    print(f"{'ok' if st == CXR_OK else 'FAIL':4} test package opens: {st} {msg[:100]}")
    if st != CXR_OK:
        failures.append(f"test package: cxr_open {st}: {msg}")

    a0 = lambda m: m["artifacts"][0]   # noqa: E731
    malformed = [   # (name, edit, words the C message must contain)
        ("file-int", lambda m: a0(m).update(file=123), "file"),
        ("sha-null", lambda m: a0(m).update(sha256=None), "sha256"),
        ("sha-short", lambda m: a0(m).update(sha256="abc"), "sha256"),
        ("gate-list", lambda m: a0(m).update(gate=[]), "gate"),
        ("gate-entry-bool", lambda m: a0(m)["gate"].update({"openvino/fp32": True}), "gate"),
        ("bytes-negative", lambda m: a0(m).update(bytes=-1), "bytes"),
        ("unknown-key", lambda m: a0(m).update(colour="red"), "colour"),
        ("companion-bad", lambda m: a0(m).update(companions=[{"file": "x.bin", "sha256": 5, "bytes": 1}]), "companions"),
        ("classes-dup", lambda m: m.update(classes=["a", "a", "b"]), "classes"),
        ("channels-2", lambda m: m["preprocess"].update(channels=2), "channels"),
        ("reference-shape", lambda m: m.update(reference_set={"file": "reference.u16", "sha256": "0" * 64,
                                                                "bytes": 8, "shape": [1, 2]}), "reference_set"),
    ]
    cases = []
    for name, edit, word in malformed:
        d = variant(pkg, scratch, name, edit)
        if not schema_invalid(json.loads((d / MODEL_JSON).read_text())):
            failures.append(f"{name}: the schema accepts it")
        cases.append((name, d, word))
    # structurally valid, semantically wrong: the schema accepts them, both readers refuse
    cases.append(("zero-sha", variant(pkg, scratch, "zero-sha", lambda m: a0(m).update(sha256="0" * 64)), "checksum mismatch"))
    d = variant(pkg, scratch, "flipped-byte", copy=(meta["artifacts"][0]["file"],))
    flip_last_byte(d / meta["artifacts"][0]["file"])
    cases.append(("flipped-byte", d, "checksum mismatch"))
    d = variant(pkg, scratch, "symlink-out")
    (d / meta["artifacts"][0]["file"]).unlink()
    (d / meta["artifacts"][0]["file"]).symlink_to((pkg / meta["artifacts"][0]["file"]).resolve())
    cases.append(("symlink-out", d, "symlink leaving"))
    d = variant(pkg, scratch, "symlink-passwd")
    (d / meta["artifacts"][0]["file"]).unlink()
    (d / meta["artifacts"][0]["file"]).symlink_to("/etc/passwd")
    cases.append(("symlink-passwd", d, "symlink leaving"))
    for f in ("model.safetensors", "weights.bin", "reference.u16"):
        d = variant(pkg, scratch, "unlisted-" + f, edit=lambda m: m.pop("reference_set", None)
                    if f == "reference.u16" else None)
        # unlink first: the variant's files are hard links to the real package, and writing through
        # one would overwrite the shipped file
        (d / f).unlink(missing_ok=True)
        (d / f).write_bytes(b"\0" * 32)
        cases.append(("unlisted " + f, d, "not listed"))
    d = variant(pkg, scratch, "deep")
    (d / MODEL_JSON).write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    cases.append(("deep nesting", d, "nesting depth"))
    d = variant(pkg, scratch, "nan-mean")
    (d / MODEL_JSON).write_text((d / MODEL_JSON).read_text().replace('"mean": [', '"mean": [NaN, ', 1))
    cases.append(("NaN in mean", d, "JSON"))
    try:
        cases.append(("onnx external data", external_data_package(pkg, scratch), "external data"))
    except ImportError:
        print("skip onnx external data (no onnx package)")

    for name, d, word in cases:
        st, msg = c_open(d)
        try:
            ModelPackage.read(d)
            py = "accepted"
        except PackageError as e:
            py = str(e)
        ok = st == CXR_E_PACKAGE and word in msg and "\n" not in msg and py != "accepted"
        print(f"{'ok' if ok else 'FAIL':4} {name:24s} C: {st} {msg[-110:]}")
        if not ok:
            failures.append(f"{name}: C status {st} ({msg}); python: {py}")
    print("package trust: " + ("FAILED\n  " + "\n  ".join(failures) if failures else "all variants refused"))
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
