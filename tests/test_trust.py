"""Issue 14: every byte that can change an answer is listed and checksummed, model.json is checked
against its JSON Schema, and a bad package is one line (exit 2), never a traceback.

All packages here are GENERATED: a tiny ONNX graph (Flatten -> Gemm) written with onnx.helper, so
the tests need neither torch nor the shipped default model, and run ONNX Runtime / OpenVINO for real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_edge.package import (DEFAULT_PACKAGE, MAX_JSON_DEPTH, MODEL_JSON, SCHEMA_PATH, Artifact, ModelPackage,
                              PackageError, schema, schema_error, sha256_file)
from cxr_edge.preprocess import PreprocessSpec

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SIZE, CH = 8, 1


def make_onnx(path: Path, k: int = 3, external: str | None = None, seed: int = 0) -> Path:
    """(N, CH, SIZE, SIZE) float -> logits (N, k): Flatten then Gemm. `external`: keep the weights in
    that ONNX external-data file next to the model."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((CH * SIZE * SIZE, k)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("Gemm", ["flat", "net.head.0.weight_t", "net.head.0.bias"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CH, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
        [numpy_helper.from_array(w, "net.head.0.weight_t"), numpy_helper.from_array(b, "net.head.0.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external, size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def make_package(root: Path, classes=("covid", "normal", "pneumonia"), width: int | None = None,
                 external: str | None = None) -> Path:
    """A complete package: model.onnx (optionally with external data), gates passed for the CPU backends."""
    root.mkdir(parents=True)
    make_onnx(root / "model.onnx", k=width or len(classes), external=external)
    spec = PreprocessSpec(size=SIZE, channels=CH, mean=(0.5,), std=(0.25,))
    pkg = ModelPackage(root=root, name="tiny-generated", classes=list(classes), preprocess=spec, normal_class="normal")
    gate = {f"{b}/fp32": {"passed": True} for b in ("onnxruntime", "openvino")}
    pkg.add_artifact(Artifact(file="model.onnx", format="onnx", precision="fp32", gate=gate))
    pkg.write()
    return root


def edit(root: Path, fn) -> None:
    meta = json.loads((root / MODEL_JSON).read_text())
    fn(meta)
    (root / MODEL_JSON).write_text(json.dumps(meta))


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxr_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str):
    """Exit 2, one 'cxr-edge: error:' line naming each needle, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cxr-edge: error:")]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture()
def pkg(tmp_path) -> Path:
    return make_package(tmp_path / "pkg")


# -- schema --------------------------------------------------------------------------------------
def test_schema_is_valid_json_schema_and_matches_the_shipped_package():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema())
    assert json.loads(SCHEMA_PATH.read_text())["$schema"].endswith("2020-12/schema")
    meta = json.loads((DEFAULT_PACKAGE / MODEL_JSON).read_text())
    assert schema_error(meta) is None
    assert not list(jsonschema.Draft202012Validator(schema()).iter_errors(meta))


BAD_FIELDS = [
    ("artifacts[0].file", lambda m: m["artifacts"][0].update(file=123), "must be string, got integer 123"),
    ("artifacts[0].sha256", lambda m: m["artifacts"][0].update(sha256=None), "must be string, got null"),
    ("artifacts[0].gate", lambda m: m["artifacts"][0].update(gate=[]), "must be object, got array"),
    ("artifacts[0].sha256", lambda m: m["artifacts"][0].update(sha256="abc"), "does not match"),
    ("artifacts[0].bytes", lambda m: m["artifacts"][0].update(bytes=-1), "must be >= 0"),
    ("artifacts[0].colour", lambda m: m["artifacts"][0].update(colour="red"), "unexpected key"),
    ("artifacts[0].format", lambda m: m["artifacts"][0].pop("format"), "missing"),
    ("artifacts[0].gate.onnxruntime/fp32", lambda m: m["artifacts"][0]["gate"].update({"onnxruntime/fp32": True}),
     "must be object"),
    ("artifacts[0].companions[0].sha256",
     lambda m: m["artifacts"][0].update(companions=[{"file": "x.bin", "sha256": 5, "bytes": 1}]), "must be string"),
    ("bad preprocess spec", lambda m: m["preprocess"].update(channels=2), "channels must be 1 or 3"),
    ("task", lambda m: m.update(task="segmentation"), "must be one of"),
    ("provenance", lambda m: m.update(provenance=[]), "must be object"),
    ("reference_set.shape", lambda m: m.update(reference_set={"file": "reference.u16", "sha256": "0" * 64,
                                                                "bytes": 8, "shape": [1, 2]}), "at least 3 items"),
]


@pytest.mark.parametrize("field,change,problem", BAD_FIELDS, ids=[b[0] + ":" + b[2][:12] for b in BAD_FIELDS])
def test_malformed_field_is_one_line_naming_field_and_problem(pkg, field, change, problem):
    edit(pkg, change)
    with pytest.raises(PackageError) as e:
        ModelPackage.read(pkg)
    msg = str(e.value)
    assert "\n" not in msg and f"{field}:" in msg and problem in msg, msg
    jsonschema = pytest.importorskip("jsonschema")   # the real validator agrees that it is invalid
    meta = json.loads((pkg / MODEL_JSON).read_text())
    assert list(jsonschema.Draft202012Validator(schema()).iter_errors(meta))


def test_malformed_field_on_the_cli_is_exit_2_one_line(pkg, tmp_path):
    edit(pkg, lambda m: m["artifacts"][0].update(file=123))
    one_line_error(cli("info", "--model", pkg), "artifacts[0].file", "must be string")
    img = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(img)
    one_line_error(cli("classify", img, "--model", pkg), "artifacts[0].file")


def test_deep_nesting_refused_without_recursion_error(pkg):
    original = (pkg / MODEL_JSON).read_text()
    (pkg / MODEL_JSON).write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(PackageError, match=rf"nesting depth 200001 exceeds the limit of {MAX_JSON_DEPTH}"):
        ModelPackage.read(pkg)
    one_line_error(cli("info", "--model", pkg), "nesting depth")
    # brackets inside strings do not count
    (pkg / MODEL_JSON).write_text(original)
    edit(pkg, lambda m: m["provenance"].update(note="[" * 10_000))
    assert ModelPackage.read(pkg).provenance["note"] == "[" * 10_000


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_refused(pkg, bad):
    text = (pkg / MODEL_JSON).read_text()
    meta = json.loads(text)
    mean = json.dumps(meta["preprocess"]["mean"])
    (pkg / MODEL_JSON).write_text(text.replace(f'"mean": {mean}', f'"mean": [{bad}]', 1)
                                  if f'"mean": {mean}' in text else text.replace('"mean":', f'"mean": [{bad}], "x":', 1))
    with pytest.raises(PackageError, match=f"{bad.lstrip('-')}|not valid JSON"):
        ModelPackage.read(pkg)


def test_huge_mean_is_finite_check(pkg):
    edit(pkg, lambda m: m["preprocess"].update(mean=[1e400]))   # json.dumps writes Infinity
    with pytest.raises(PackageError, match="Infinity"):
        ModelPackage.read(pkg)


# -- class count vs model output width -------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("classes", [("covid", "normal"), ("covid", "normal", "pneumonia", "other")])
def test_class_count_must_equal_output_width(tmp_path, backend, classes):
    import cxr_edge
    root = make_package(tmp_path / "p", classes=classes, width=3)
    with pytest.raises(PackageError, match=rf"model.json lists {len(classes)} classes .* outputs 3 logits"):
        cxr_edge.load(root, backend=backend, precision="fp32")
    img = tmp_path / "x.png"
    from PIL import Image
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(img)
    one_line_error(cli("classify", img, "--model", root, "--backend", backend), "classes", "outputs 3 logits")


def test_matching_width_loads_and_sums_to_one(pkg, tmp_path):
    import cxr_edge
    from PIL import Image
    img = tmp_path / "x.png"
    Image.fromarray((np.arange(256).reshape(16, 16) % 251).astype(np.uint8)).save(img)
    for backend in ("onnxruntime", "openvino"):
        r = cxr_edge.load(pkg, backend=backend, precision="fp32").predict([str(img)])[0]
        assert r.ok and abs(sum(r.probabilities.values()) - 1) < 1e-5


# -- files: inside, regular, size first, checksummed ---------------------------------------------
def test_symlink_leaving_the_package_refused(pkg, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    os.replace(pkg / "model.onnx", outside)
    (pkg / "model.onnx").symlink_to(outside)                  # byte-identical file, but outside
    with pytest.raises(PackageError, match="symlink leaving the package"):
        ModelPackage.read(pkg)


def test_symlink_inside_the_package_is_followed(pkg):
    os.replace(pkg / "model.onnx", pkg / "real.onnx.keep")
    (pkg / "model.onnx").symlink_to("real.onnx.keep")
    assert ModelPackage.read(pkg).artifacts[0].file == "model.onnx"


def test_symlink_to_etc_passwd_refused_without_hashing(pkg):
    (pkg / "model.onnx").unlink()
    (pkg / "model.onnx").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="symlink leaving the package"):
        ModelPackage.read(pkg)


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="no /proc/self/pagemap here")
def test_special_file_is_refused_not_hashed(pkg, tmp_path):
    # a link inside the package to a special file: refused as not regular, without reading it
    (pkg / "model.onnx").unlink()
    os.symlink("/proc/self/pagemap", pkg / "model.onnx")
    with pytest.raises(PackageError, match="model.onnx"):
        ModelPackage.read(pkg)
    # a FIFO in the package: opened non-blocking and refused, never read (would block forever)
    (pkg / "model.onnx").unlink()
    os.mkfifo(pkg / "model.onnx")
    with pytest.raises(PackageError, match="not a regular file"):
        ModelPackage.read(pkg)


def test_size_compared_before_hashing(pkg):
    with open(pkg / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match=r"model.onnx has \d+ bytes, model.json says \d+: corrupted or replaced"):
        ModelPackage.read(pkg)


@pytest.mark.parametrize("how", ["flip", "zero_sha", "flip_sha"])
def test_one_flipped_byte_or_bad_checksum_refused(pkg, how):
    if how == "flip":
        data = bytearray((pkg / "model.onnx").read_bytes())
        data[-5] ^= 0x01
        (pkg / "model.onnx").write_bytes(bytes(data))
    elif how == "zero_sha":
        edit(pkg, lambda m: m["artifacts"][0].update(sha256="0" * 64))
    else:
        edit(pkg, lambda m: m["artifacts"][0].update(sha256=m["artifacts"][0]["sha256"][::-1]))
    with pytest.raises(PackageError, match="model.onnx checksum mismatch"):
        ModelPackage.read(pkg)


# -- every file that can change an answer ----------------------------------------------------------
def test_onnx_external_data_refused(tmp_path):
    root = make_package(tmp_path / "p", external="weights.bin")
    edit(root, lambda m: None)
    with pytest.raises(PackageError) as e:
        ModelPackage.read(root)
    # weights.bin is unlisted AND model.onnx uses external data: either way it is refused
    assert "weights.bin" in str(e.value) or "external data" in str(e.value)
    # even when the external file has a name no suffix rule catches
    root2 = make_package(tmp_path / "q", external="weights")
    with pytest.raises(PackageError, match="keeps weights in ONNX external data"):
        ModelPackage.read(root2)
    one_line_error(cli("info", "--model", root2), "external data")


def test_swapped_external_weights_never_reach_a_backend(tmp_path):
    import cxr_edge
    root = make_package(tmp_path / "p", external="weights")
    data = bytearray((root / "weights").read_bytes())
    data[:4], data[4:8] = data[4:8], data[:4]
    (root / "weights").write_bytes(bytes(data))
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(PackageError, match="external data"):
            cxr_edge.load(root, backend=backend, precision="fp32")


@pytest.mark.parametrize("name", ["model.safetensors", "weights.bin", "model.xml", "extra.onnx", "reference.u16",
                                  "MODEL.SAFETENSORS"])
def test_unlisted_weight_file_refused(pkg, name):
    (pkg / name).write_bytes(b"\0" * 64)
    with pytest.raises(PackageError, match=rf"{name} is in the package but not listed in model.json"):
        ModelPackage.read(pkg)


def test_unlisted_documents_are_fine(pkg):
    (pkg / "MODEL_CARD.md").write_text("# card\n")
    (pkg / "confusion_matrix.png").write_bytes(b"\x89PNG")
    ModelPackage.read(pkg)


def test_listed_safetensors_is_checksummed(pkg):
    st = pytest.importorskip("safetensors.numpy")
    w = np.ones((3, 64), np.float32)
    st.save_file({"head.0.weight": w}, str(pkg / "model.safetensors"))
    p = ModelPackage.read(pkg, verify=False)
    p.add_artifact(Artifact(file="model.safetensors", format="safetensors", precision="fp32"))
    p.write()
    assert ModelPackage.read(pkg).artifact("fp32", "safetensors").sha256 == sha256_file(pkg / "model.safetensors")
    data = bytearray((pkg / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pkg / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="model.safetensors checksum mismatch"):
        ModelPackage.read(pkg)


def test_openvino_ir_bin_must_be_a_checksummed_companion(pkg):
    ov = pytest.importorskip("openvino")
    ov.save_model(ov.convert_model(str(pkg / "model.onnx")), str(pkg / "model.xml"), compress_to_fp16=False)
    p = ModelPackage.read(pkg, verify=False)
    p.artifacts.append(Artifact(file="model.xml", format="openvino-ir", precision="fp32"))
    p.write()
    with pytest.raises(PackageError, match=r"OpenVINO IR model.xml needs its weights model.bin listed in 'companions'"):
        ModelPackage.read(pkg)
    p.artifacts[-1].companions = [{"file": "model.bin"}]
    p.write()
    pkg2 = ModelPackage.read(pkg)
    assert pkg2.artifacts[-1].companions[0]["sha256"] == sha256_file(pkg / "model.bin")
    data = bytearray((pkg / "model.bin").read_bytes())
    data[0] ^= 0x01
    (pkg / "model.bin").write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"artifacts\[1\].companions\[0\] file model.bin checksum mismatch"):
        ModelPackage.read(pkg)


def test_reference_set_is_checksummed(pkg):
    k = 2
    ref = (np.arange(k * SIZE * SIZE) % 65536).astype("<u2")
    (pkg / "reference.u16").write_bytes(ref.tobytes())
    p = ModelPackage.read(pkg, verify=False)
    p.reference_set = {"file": "reference.u16", "sha256": "", "bytes": 0, "shape": [k, SIZE, SIZE], "scale": 65535,
                       "source": "generated", "logits": [[0.0] * 3] * k, "probabilities": [[1 / 3] * 3] * k}
    p.write()
    got = ModelPackage.read(pkg).reference_set
    assert got["sha256"] == sha256_file(pkg / "reference.u16") and got["bytes"] == ref.nbytes
    data = bytearray((pkg / "reference.u16").read_bytes())
    data[3] ^= 0x10
    (pkg / "reference.u16").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="reference_set file reference.u16 checksum mismatch"):
        ModelPackage.read(pkg)
    edit(pkg, lambda m: m["reference_set"].update(shape=[k, SIZE + 1, SIZE + 1]))
    with pytest.raises(PackageError, match=r"reference_set.shape: .* does not match the input size"):
        ModelPackage.read(pkg)


def test_default_package_verifies():
    pkg = ModelPackage.read(DEFAULT_PACKAGE)
    assert all(a.sha256 == sha256_file(pkg.path(a)) for a in pkg.artifacts)
