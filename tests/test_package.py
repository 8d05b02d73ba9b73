"""The model package reader refuses every broken package with a message naming the problem."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cxr_edge.package import MODEL_JSON, SCHEMA_VERSION, ModelPackage, PackageError, sha256_file


def copy_package(src: Path, dst: Path, copy=()) -> Path:
    """model.json copied; artifacts hard-linked (cheap; a symlink leaving the package is refused) or
    copied across file systems, and the names in `copy` always real copies."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == MODEL_JSON or f.name in copy:
            shutil.copy2(f, dst / f.name)
        else:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return dst


def edit(pkg: Path, fn) -> dict:
    meta = json.loads((pkg / MODEL_JSON).read_text())
    fn(meta)
    (pkg / MODEL_JSON).write_text(json.dumps(meta))
    return meta


def test_reads_the_real_package(tiny_package):
    pkg = ModelPackage.read(tiny_package)
    assert pkg.classes == ["covid", "normal", "pneumonia"] and pkg.normal_class == "normal"
    assert pkg.disease_classes == ["covid", "pneumonia"]
    fp32 = pkg.artifact("fp32", "onnx")
    assert fp32 is not None and fp32.sha256 == sha256_file(pkg.path(fp32)) and fp32.bytes > 1_000_000
    assert fp32.passed_for("onnxruntime", "fp32") and not fp32.passed_for("onnxruntime", "int8")
    assert pkg.preprocess.size == 96


def test_newer_schema_refused(tiny_package, tmp_path):
    p = copy_package(tiny_package, tmp_path / "p")
    edit(p, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(PackageError, match=rf"schema_version {SCHEMA_VERSION + 1} is newer than this cxr-edge"):
        ModelPackage.read(p)
    edit(p, lambda m: m.pop("schema_version"))
    with pytest.raises(PackageError, match="schema_version missing"):
        ModelPackage.read(p)


def test_corrupt_json_refused(tiny_package, tmp_path):
    p = copy_package(tiny_package, tmp_path / "p")
    text = (p / MODEL_JSON).read_text()
    (p / MODEL_JSON).write_text(text[: len(text) // 2])           # cut mid-way, as a failed copy leaves it
    with pytest.raises(PackageError, match=r"model\.json: not valid JSON"):
        ModelPackage.read(p)
    (p / MODEL_JSON).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PackageError, match="not valid JSON"):
        ModelPackage.read(p)
    (p / MODEL_JSON).write_text("[1, 2, 3]")
    with pytest.raises(PackageError, match="top level must be an object"):
        ModelPackage.read(p)


def test_missing_package_or_model_json(tmp_path):
    with pytest.raises(PackageError, match="model package directory not found"):
        ModelPackage.read(tmp_path / "nope.cxrpkg")
    (tmp_path / "empty.cxrpkg").mkdir()
    with pytest.raises(PackageError, match=r"no model\.json in the model package"):
        ModelPackage.read(tmp_path / "empty.cxrpkg")


def test_missing_artifact_refused(tiny_package, tmp_path):
    p = copy_package(tiny_package, tmp_path / "p")
    (p / "model.int8.onnx").unlink()
    with pytest.raises(PackageError, match=r"artifacts\[1\] file model\.int8\.onnx listed in model\.json is missing"):
        ModelPackage.read(p)
    # verify=False reads the description without touching the files
    assert ModelPackage.read(p, verify=False).artifact("int8") is not None


def test_checksum_mismatch_refused(tiny_package, tmp_path):
    p = copy_package(tiny_package, tmp_path / "p", copy=("model.int8.onnx",))
    f = p / "model.int8.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # one flipped byte in the weights
    f.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"artifacts\[1\] file model\.int8\.onnx checksum mismatch .*corrupted or replaced"):
        ModelPackage.read(p)


def test_unknown_normal_class_refused(tiny_package, tmp_path):
    p = copy_package(tiny_package, tmp_path / "p")
    edit(p, lambda m: m.update(normal_class="healthy"))
    with pytest.raises(PackageError, match=r"normal_class 'healthy' is not one of the classes"):
        ModelPackage.read(p)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(classes=["covid", "covid", "normal"]), "'classes' must be 2\\+ distinct"),
    (lambda m: m.update(classes="covid"), "'classes' missing or not a list"),
    (lambda m: m["preprocess"].update(resize="squash"), "bad preprocess spec: resize policy 'squash' unknown"),
    (lambda m: m["preprocess"].update(colour=True), "bad preprocess spec: unknown preprocessing keys"),
    (lambda m: m["artifacts"][0].update(file="../model.onnx"), "must be a plain name inside the package"),
    (lambda m: m["artifacts"][0].update(weight=1), r"artifacts\[0\]\.weight: unexpected key"),
])
def test_malformed_fields_refused(tiny_package, tmp_path, change, message):
    p = copy_package(tiny_package, tmp_path / "p")
    edit(p, change)
    with pytest.raises(PackageError, match=message):
        ModelPackage.read(p)
