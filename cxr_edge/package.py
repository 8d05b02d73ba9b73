"""Model package: a directory with model.json and its artifacts. The one source of truth.

model.json (schema_version 1; its structure is the JSON Schema cxr_edge/schema/model.schema.json):
  name, task ("classification"), classes (ordered), normal_class (the class that is "no disease"),
  preprocess (PreprocessSpec), architecture ({name, head, in_channels, ...} for the torch reference),
  cam ({"features_output": "features", "kind": "gap_linear" | "gap_mlp"} when exported with features),
  provenance ({...free-form: training run, data, metrics, model card}),
  reference_set ({file, sha256, bytes, shape [K, size, size], scale, source, logits, probabilities}),
  calibration, operating_points, input_guard (cxr_edge/guard.py; input_guard.mahalanobis and
  input_guard.by_precision.<precision>.mahalanobis =
  {file, sha256, bytes, classes, channels, rank, isotropic_precision, ...}: the guard's parameter file),
  artifacts: [{file, sha256, bytes, format, precision, outputs, companions: [{file, sha256, bytes}],
               parity: {"<backend>/<precision>": {...}}, gate: {"<backend>/<precision>": {passed, ...}}}]

Trust rules (ModelPackage.read with verify=True, mirrored by the C SDK's read_package):
  * model.json: at most MAX_JSON_BYTES, nesting at most MAX_JSON_DEPTH, no NaN/Infinity, valid
    against the schema (one error line naming the field, e.g. "artifacts[0].sha256: must be a
    string, got null").
  * every file model.json lists (artifacts, their companions such as the OpenVINO IR .bin, the
    reference set, the input guard's parameters) is a regular file inside the package (a symlink
    may only point inside it), its size equals `bytes` (compared before hashing: a special file
    such as /proc/self/pagemap is refused without reading it) and its SHA-256 equals `sha256`.
    (The C SDK has no input guard yet: it neither reads nor verifies input_guard's parameter files,
    and its suffix list lacks ".f32".)
  * an ONNX artifact must embed its weights: external data (a weights file next to the .onnx that
    its own checksum does not cover) is refused.
  * an unlisted file with a weights-like suffix (WEIGHT_SUFFIXES) in the package is refused: nothing
    outside the checksums can change an answer.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .preprocess import PreprocessSpec

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
DEFAULT_PACKAGE = Path(__file__).parent / "models" / "default.cxrpkg"
SCHEMA_PATH = Path(__file__).parent / "schema" / "model.schema.json"
MAX_JSON_BYTES = 64 << 20   # model.json larger than this is refused before parsing
MAX_JSON_DEPTH = 64         # deepest nesting accepted (the shipped model.json nests 7 deep)
# Files a runtime could read as weights. One of these in the package that model.json does not list
# (checksum and all) is refused: e.g. a dropped-in model.safetensors, a swapped external-data file.
WEIGHT_SUFFIXES = frozenset({".onnx", ".data", ".onnx_data", ".bin", ".xml", ".safetensors", ".pt", ".pth",
                             ".ckpt", ".pkl", ".npy", ".npz", ".u16", ".f32", ".engine", ".plan", ".trt",
                             ".pb", ".tflite", ".h5", ".blob"})
ONNX_FORMATS = ("onnx", "onnx-qdq")
# An ONNX TensorProto's external_data entry {key: "location", value: ...} as protobuf bytes:
# field 1 (key), length 8, "location". Absent from a file => no tensor in it uses external data.
_EXTERNAL_DATA_MARK = b"\x0a\x08location"


class PackageError(Exception):
    """A model package is missing, malformed, or its files do not match model.json."""


def sha256_file(path: os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# -- model.json: bounded parse and schema ---------------------------------------------------------
def _json_depth(text: str) -> int:
    """Deepest [ / { nesting in JSON text, strings skipped; linear time, no recursion."""
    depth = deepest = 0
    for tok in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        c = tok.group()
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number (non-finite values are not allowed)")


def parse_model_json(text: str, where: str) -> dict:
    """model.json text -> dict, refusing oversize, over-deep and non-finite input with one line.

    Raises:
        PackageError: not valid JSON, NaN/Infinity, deeper than MAX_JSON_DEPTH, or not an object.
    """
    if len(text) > MAX_JSON_BYTES:
        raise PackageError(f"{where}: {len(text)} characters, more than the {MAX_JSON_BYTES} allowed")
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise PackageError(f"{where}: nesting depth {depth} exceeds the limit of {MAX_JSON_DEPTH}")
    try:
        meta = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise PackageError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise PackageError(f"{where}: top level must be an object")
    return meta


_SCHEMA = None


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of model.json shipped with this package."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = json.loads(SCHEMA_PATH.read_text())
    return _SCHEMA


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_name(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _is_type(v, t: str) -> bool:
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return isinstance(v, _TYPES[t])


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, (dict, list)) else _type_name(v)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_error(value, sch: dict | None = None, path: str = "") -> str | None:
    """The first violation of `sch` (default: the model.json schema) as "<field>: <problem>", or None.

    A small validator for the keywords the schema uses (type, enum, const, required, properties,
    additionalProperties, items, min/maxItems, uniqueItems, min/maxLength, pattern, minimum,
    maximum, exclusiveMinimum, $ref to #/$defs): `jsonschema` is not a runtime dependency because
    its current releases need the compiled rpds-py. tests/test_package.py checks that both agree.
    """
    root = schema() if sch is None else sch
    return _check(value, root, path, root)


def _check(v, s: dict, path: str, root: dict) -> str | None:
    if "$ref" in s:
        ref = s["$ref"]
        assert ref.startswith("#/$defs/"), ref
        s = {**root["$defs"][ref[len("#/$defs/"):]], **{k: x for k, x in s.items() if k != "$ref"}}
    where = path or "model.json"
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is_type(v, t) for t in types):
            got = _type_name(v) if isinstance(v, (dict, list)) or v is None else f"{_type_name(v)} {_short(v)}"
            return f"{where}: must be {' or '.join(types)}, got {got}"
    if "enum" in s and not any(v == e and type(v) is type(e) for e in s["enum"]):
        return f"{where}: must be one of {', '.join(json.dumps(e) for e in s['enum'])}, got {_short(v)}"
    if "const" in s and v != s["const"]:
        return f"{where}: must be {json.dumps(s['const'])}, got {_short(v)}"
    if isinstance(v, dict):
        for k in s.get("required", ()):
            if k not in v:
                return f"{(path + '.' if path else '') + k}: missing"
        props = s.get("properties", {})
        for k, x in v.items():
            sub = f"{path}.{k}" if path else k
            if k in props:
                err = _check(x, props[k], sub, root)
            elif s.get("additionalProperties") is False:
                return f"{sub}: unexpected key (known: {', '.join(props)})"
            elif isinstance(s.get("additionalProperties"), dict):
                err = _check(x, s["additionalProperties"], sub, root)
            else:
                err = None
            if err:
                return err
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0):
            return f"{where}: needs at least {s['minItems']} items, got {len(v)}"
        if "maxItems" in s and len(v) > s["maxItems"]:
            return f"{where}: at most {s['maxItems']} items, got {len(v)}"
        if s.get("uniqueItems") and len({json.dumps(x, sort_keys=True) for x in v}) != len(v):
            return f"{where}: items must be distinct, got {_short(v)}"
        if "items" in s:
            for i, x in enumerate(v):
                err = _check(x, s["items"], f"{path}[{i}]", root)
                if err:
                    return err
    if isinstance(v, str):
        if len(v) < s.get("minLength", 0):
            return f"{where}: must not be empty" if s["minLength"] == 1 else f"{where}: too short"
        if "maxLength" in s and len(v) > s["maxLength"]:
            return f"{where}: longer than {s['maxLength']} characters"
        if "pattern" in s and not re.search(s["pattern"], v):
            return f"{where}: {_short(v)} {s.get('description') or 'does not match ' + s['pattern']}"
    if _is_type(v, "number"):
        if "minimum" in s and v < s["minimum"]:
            return f"{where}: must be >= {s['minimum']}, got {v}"
        if "maximum" in s and v > s["maximum"]:
            return f"{where}: must be <= {s['maximum']}, got {v}"
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            return f"{where}: must be > {s['exclusiveMinimum']}, got {v}"
    return None


# -- files listed in model.json: inside, regular, size first, then hash ----------------------------
def verify_file(root: Path, name: str, sha256: str, size: int, field_name: str, onnx: bool = False) -> None:
    """Check one listed file: a plain name, a regular file inside `root` (a symlink only to a file
    inside it), `size` bytes (compared before reading anything), then its SHA-256; an ONNX file
    must not reference external data.

    Raises:
        PackageError: naming the field, the file and the problem.
    """
    if not name or Path(name).name != name or name in (".", "..") or "\\" in name or "\0" in name:
        raise PackageError(f"{root}: {field_name} file {name!r} must be a plain name inside the package")
    p = root / name
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise PackageError(f"{root}: {field_name} file {name} listed in {MODEL_JSON} is missing") from None
    except OSError as e:
        raise PackageError(f"{root}: {field_name} file {name} cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(p))
        inside = Path(os.path.realpath(root))
        if target.parent != inside and inside not in target.parents:
            raise PackageError(f"{root}: {field_name} file {name} is a symlink leaving the package (to {target}); "
                               "copy the file into the package")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise PackageError(f"{root}: {field_name} file {name} cannot be opened ({e.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PackageError(f"{root}: {field_name} file {name} is not a regular file")
        if st.st_size != size:
            raise PackageError(f"{root}: {field_name} file {name} has {st.st_size} bytes, {MODEL_JSON} says {size}: "
                               "corrupted or replaced")
        h, tail, read, external = hashlib.sha256(), b"", 0, False
        buf = bytearray(4 << 20)
        view, m = memoryview(buf), len(_EXTERNAL_DATA_MARK)
        while read <= size:
            n = f.readinto(view[:min(len(buf), size + 1 - read)])
            if not n:
                break
            read += n
            h.update(view[:n])
            if onnx and not external:
                external = (buf.find(_EXTERNAL_DATA_MARK, 0, n) >= 0
                            or _EXTERNAL_DATA_MARK in tail + bytes(view[:min(n, m)]))
                tail = bytes(view[max(0, n - m):n])
    if read != size:
        raise PackageError(f"{root}: {field_name} file {name} changed while it was read ({read} of {size} bytes)")
    digest = h.hexdigest()
    if digest != sha256:
        raise PackageError(f"{root}: {field_name} file {name} checksum mismatch "
                           f"({MODEL_JSON} {sha256[:12]}…, file {digest[:12]}…): corrupted or replaced")
    if external and _onnx_uses_external_data(p):
        raise PackageError(f"{root}: {field_name} file {name} keeps weights in ONNX external data, which its "
                           "checksum does not cover; re-export with the weights embedded")


def _onnx_uses_external_data(path: Path) -> bool:
    """True when some tensor of the ONNX file at `path` has its data in an external file. Only
    called when the protobuf bytes of an external-data entry occur in the file; without the onnx
    package that is taken as a yes (refusing is the safe side)."""
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data
    except ImportError:
        return True
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return True
    return any(uses_external_data(t) for t in _get_all_tensors(model))


@dataclass
class Artifact:
    """One runnable model file of a package (model.json `artifacts[i]`).

    Attributes:
        file, format, precision: the file name in the package, its format (e.g. "onnx", "openvino-ir"),
            and the precision it was exported at.
        sha256, bytes: checksum and size of `file`, as stamped by `ModelPackage.write`.
        companions: [{file, sha256, bytes}] of other files read with `file` (the OpenVINO IR .bin).
        parity, gate: keyed by "<backend>/<run precision>": measurements against torch fp32, and the gate verdict.
    """
    file: str
    format: str
    precision: str
    sha256: str = ""
    bytes: int = 0
    outputs: list = field(default_factory=lambda: ["logits"])
    # Other files the runtime reads with `file` ({file, sha256, bytes}): the OpenVINO IR .bin.
    companions: list = field(default_factory=list)
    # Both keyed by "<backend>/<run precision>" (e.g. "openvino/bf16"): one artifact file runs on
    # several backends and precisions, and each combination is measured and gated on its own.
    parity: dict = field(default_factory=dict)   # measured against the torch fp32 reference
    gate: dict = field(default_factory=dict)     # {"passed": bool, "tolerance": {...}, "failures": [...]}
    extra: dict = field(default_factory=dict)    # e.g. quantization settings, ignored scope

    def passed_for(self, backend: str, precision: str) -> bool:
        """True when the parity gate for this backend and run precision recorded a pass."""
        return bool(self.gate.get(f"{backend}/{precision}", {}).get("passed"))

    def to_dict(self) -> dict:
        """The artifact as its model.json entry (`companions` only when there are any)."""
        d = {k: getattr(self, k) for k in
             ("file", "sha256", "bytes", "format", "precision", "outputs", "parity", "gate", "extra")}
        if self.companions:
            d["companions"] = [dict(c) for c in self.companions]
        return d


def _stamp(root: Path, artifact: Artifact) -> None:
    """Record sha256 and bytes of an artifact's file and of its companions, as they are on disk."""
    p = root / artifact.file
    artifact.sha256, artifact.bytes = sha256_file(p), p.stat().st_size
    for c in artifact.companions:
        q = root / c["file"]
        c.update(sha256=sha256_file(q), bytes=q.stat().st_size)


def guard_records(input_guard: dict | None) -> list[tuple[str, dict]]:
    """The input guard's parameter-file records (guard.py) as (model.json field, record): the fp32
    features' "input_guard.mahalanobis", then one per run precision fitted on its own features,
    "input_guard.by_precision.<precision>.mahalanobis"."""
    g = input_guard if isinstance(input_guard, dict) else {}
    out = [("input_guard.mahalanobis", g["mahalanobis"])] if g.get("mahalanobis") else []
    by = g.get("by_precision") if isinstance(g.get("by_precision"), dict) else {}
    out += [(f"input_guard.by_precision.{p}.mahalanobis", e["mahalanobis"]) for p, e in by.items()
            if isinstance(e, dict) and e.get("mahalanobis")]
    return out


def _check_guard_record(meta: dict, meta_path: Path, num_classes: int, listed: set, verify_root: Path | None) -> None:
    """The input guard's parameter files (`guard_records`): their shape fields fit the classes and
    their byte counts, each is listed once (added to `listed`), and, with `verify_root`, each is
    checked like every listed file.

    Raises:
        PackageError: naming the field.
    """
    for field_name, rec in guard_records(meta.get("input_guard")):
        k, c, r = rec["classes"], rec["channels"], rec["rank"]
        if k != num_classes:
            raise PackageError(f"{meta_path}: {field_name}.classes: {k}, but the package has {num_classes} classes")
        if r > c:
            raise PackageError(f"{meta_path}: {field_name}.rank: {r} is more than its {c} channels")
        if rec["bytes"] != 4 * (k * c + c * r):
            raise PackageError(f"{meta_path}: {field_name}.bytes: {rec['bytes']} is not 4 x ({k} x {c} + {c} x {r}) "
                               "(float32 class means and precision correction)")
        if rec["file"] in listed:
            raise PackageError(f"{meta_path}: {field_name}.file: {rec['file']} is listed twice")
        listed.add(rec["file"])
        if verify_root is not None:
            verify_file(verify_root, rec["file"], rec["sha256"], rec["bytes"], field_name)


def unlisted_weights(root: Path, listed: set) -> None:
    """Refuse a package holding a weights-like file (WEIGHT_SUFFIXES) that model.json does not list.

    Raises:
        PackageError: naming the first such file.
    """
    try:
        names = sorted(os.listdir(root))
    except OSError as e:
        raise PackageError(f"{root}: cannot list the package ({e.strerror})") from None
    for name in names:
        if name not in listed and Path(name).suffix.lower() in WEIGHT_SUFFIXES:
            raise PackageError(f"{root}: {name} is in the package but not listed in {MODEL_JSON} (no checksum): "
                               "a weights file outside the checksums is never used; remove it or list it")


@dataclass
class ModelPackage:
    """A model package directory (`*.cxrpkg`): model.json plus the files it lists with checksums.

    Read one with `ModelPackage.read`; `write` re-stamps checksums and writes model.json.
    """
    root: Path
    name: str
    classes: list
    preprocess: PreprocessSpec
    normal_class: str | None = None
    architecture: dict = field(default_factory=dict)
    cam: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    artifacts: list = field(default_factory=list)
    task: str = "classification"
    reference_set: dict = field(default_factory=dict)  # see the shared contract: file reference.u16
    # issue 17 (train/calibrate.py writes them, cxr_edge/guard.py + classifier read them):
    calibration: dict = field(default_factory=dict)        # {"temperature": T, ...}: softmax(logits / T)
    operating_points: dict = field(default_factory=dict)   # {"sensitive": {"normal_min_probability": t, ...}}
    input_guard: dict = field(default_factory=dict)        # {"warn_below": s, "score": ..., "rates": ...}

    # -- lookup ---------------------------------------------------------------------------
    def artifact(self, precision: str, fmt: str | None = None) -> Artifact | None:
        """The first artifact of this precision (and format, when given), or None."""
        for a in self.artifacts:
            if a.precision == precision and (fmt is None or a.format == fmt):
                return a
        return None

    def path(self, artifact: Artifact) -> Path:
        """The path of an artifact's file inside the package directory."""
        return self.root / artifact.file

    @property
    def disease_classes(self) -> list:
        """The classes other than `normal_class`, in order."""
        return [c for c in self.classes if c != self.normal_class]

    # -- read ----------------------------------------------------------------------------
    @classmethod
    def read(cls, root: os.PathLike | None = None, verify: bool = True) -> "ModelPackage":
        """Read and validate the package at `root` (default: the bundled default package).

        With `verify`, every listed file's size and SHA-256 are checked and unlisted weights files are refused.

        Raises:
            PackageError: the directory or model.json is missing, unreadable, not valid JSON, newer than
                this schema_version, fails the schema or its semantic rules, or a file does not match.
        """
        root = Path(root) if root is not None else DEFAULT_PACKAGE
        meta_path = root / MODEL_JSON
        if not root.is_dir():
            raise PackageError(f"{root}: model package directory not found")
        if not meta_path.is_file():
            raise PackageError(f"{root}: no {MODEL_JSON} in the model package")
        try:
            with open(meta_path, "rb") as f:
                raw = f.read(MAX_JSON_BYTES + 1)
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PackageError(f"{meta_path}: not valid JSON ({e})") from None
        except OSError as e:
            raise PackageError(f"{meta_path}: cannot be read ({e.strerror})") from None
        meta = parse_model_json(text, str(meta_path))
        version = meta.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise PackageError(f"{meta_path}: schema_version missing or not an integer")
        if version > SCHEMA_VERSION:
            raise PackageError(f"{meta_path}: schema_version {version} is newer than this cxr-edge "
                               f"understands ({SCHEMA_VERSION}); upgrade cxr-edge")
        for key, typ in (("name", str), ("classes", list), ("preprocess", dict), ("artifacts", list)):
            if not isinstance(meta.get(key), typ):
                raise PackageError(f"{meta_path}: '{key}' missing or not a {typ.__name__}")
        classes = meta["classes"]
        if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
            raise PackageError(f"{meta_path}: 'classes' must be 2+ distinct non-empty names, got {classes}")
        normal = meta.get("normal_class")
        if normal is not None and normal not in classes:
            raise PackageError(f"{meta_path}: normal_class {normal!r} is not one of the classes {classes}")
        try:
            spec = PreprocessSpec.from_dict(meta["preprocess"])
        except (TypeError, ValueError) as e:
            raise PackageError(f"{meta_path}: bad preprocess spec: {e}") from None
        err = schema_error(meta)
        if err:
            raise PackageError(f"{meta_path}: {err}")
        # semantic rules the schema cannot say
        for key in ("mean", "std"):
            if not all(math.isfinite(x) for x in getattr(spec, key)):
                raise PackageError(f"{meta_path}: preprocess.{key}: must be finite numbers, got {list(getattr(spec, key))}")
        artifacts, listed = [], {MODEL_JSON}
        for i, a in enumerate(meta["artifacts"]):
            art = Artifact(**a)
            for name, field_name in [(art.file, f"artifacts[{i}]")] + [
                    (c["file"], f"artifacts[{i}].companions[{j}]") for j, c in enumerate(art.companions)]:
                if name in listed:
                    raise PackageError(f"{meta_path}: {field_name}.file: {name} is listed twice")
                listed.add(name)
            if art.format == "openvino-ir":
                # read_model(model.xml) reads model.bin next to it: it must be a checksummed companion
                bin_name = Path(art.file).with_suffix(".bin").name
                if bin_name not in [c["file"] for c in art.companions]:
                    raise PackageError(f"{meta_path}: artifacts[{i}]: OpenVINO IR {art.file} needs its weights "
                                       f"{bin_name} listed in 'companions' with sha256 and bytes")
            if verify:
                verify_file(root, art.file, art.sha256, art.bytes, f"artifacts[{i}]", onnx=art.format in ONNX_FORMATS)
                for j, c in enumerate(art.companions):
                    verify_file(root, c["file"], c["sha256"], c["bytes"], f"artifacts[{i}].companions[{j}]")
            artifacts.append(art)
        ref = meta.get("reference_set") or {}
        if ref:
            k, h, w = ref["shape"]
            if h != spec.size or w != spec.size:
                raise PackageError(f"{meta_path}: reference_set.shape: {ref['shape']} does not match the input size "
                                   f"{spec.size} ([K, {spec.size}, {spec.size}] expected)")
            if ref["bytes"] != 2 * k * h * w:
                raise PackageError(f"{meta_path}: reference_set.bytes: {ref['bytes']} is not 2 x {k} x {h} x {w} "
                                   "(uint16 images of that shape)")
            if ref["file"] in listed:
                raise PackageError(f"{meta_path}: reference_set.file: {ref['file']} is listed twice")
            listed.add(ref["file"])
            if verify:
                verify_file(root, ref["file"], ref["sha256"], ref["bytes"], "reference_set")
        _check_guard_record(meta, meta_path, len(classes), listed, root if verify else None)
        if verify:
            unlisted_weights(root, listed)
        return cls(root=root, name=meta["name"], classes=list(classes), preprocess=spec, normal_class=normal,
                   architecture=meta.get("architecture", {}), cam=meta.get("cam", {}),
                   provenance=meta.get("provenance", {}), artifacts=artifacts, task=meta.get("task", "classification"),
                   reference_set=dict(ref), calibration=dict(meta.get("calibration") or {}),
                   operating_points=dict(meta.get("operating_points") or {}),
                   input_guard=dict(meta.get("input_guard") or {}))

    # -- write ---------------------------------------------------------------------------
    def add_artifact(self, artifact: Artifact) -> Artifact:
        """Register (or replace) an artifact whose file already sits in the package directory."""
        _stamp(self.root, artifact)
        self.artifacts = [a for a in self.artifacts if a.file != artifact.file] + [artifact]
        return artifact

    def to_dict(self) -> dict:
        """The package as model.json content, at the current SCHEMA_VERSION."""
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "task": self.task,
            "classes": list(self.classes),
            "normal_class": self.normal_class,
            "preprocess": self.preprocess.to_dict(),
            "architecture": self.architecture,
            "cam": self.cam,
            "provenance": self.provenance,
            "artifacts": [a.to_dict() for a in self.artifacts],
            **({"reference_set": self.reference_set} if self.reference_set else {}),
            **{k: getattr(self, k) for k in ("calibration", "operating_points", "input_guard") if getattr(self, k)},
        }

    def write(self) -> Path:
        """Stamp sha256/bytes of every listed file as on disk and write model.json atomically.

        Returns the path of model.json (written to a .tmp file, then os.replace).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for a in self.artifacts:  # checksums always describe the files as written
            _stamp(self.root, a)
        if self.reference_set:
            p = self.root / self.reference_set["file"]
            self.reference_set.update(sha256=sha256_file(p), bytes=p.stat().st_size)
        for _, rec in guard_records(self.input_guard):
            p = self.root / rec["file"]
            rec.update(sha256=sha256_file(p), bytes=p.stat().st_size)
        out = self.root / MODEL_JSON
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, out)
        return out


def time_integrity(root=None, repeat: int = 5) -> dict:
    """Milliseconds to read a package with and without the integrity checks (median of `repeat`)."""
    import statistics
    import time

    def ms(verify):
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            ModelPackage.read(root, verify=verify)
            runs.append((time.perf_counter() - t) * 1e3)
        return statistics.median(runs)

    pkg = ModelPackage.read(root)
    size = (sum(a.bytes + sum(c["bytes"] for c in a.companions) for a in pkg.artifacts) + pkg.reference_set.get("bytes", 0)
            + sum(rec.get("bytes", 0) for _, rec in guard_records(pkg.input_guard)))
    full, light = ms(True), ms(False)
    return {"package": str(pkg.root), "bytes_checked": size, "read_verified_ms": round(full, 1),
            "read_unverified_ms": round(light, 1), "integrity_ms": round(full - light, 1)}


if __name__ == "__main__":   # python -m cxr_edge.package --time [PKG]: the cost of integrity checking at load
    import sys
    args = [a for a in sys.argv[1:] if a != "--time"]
    print(json.dumps(time_integrity(args[0] if args else None)))
