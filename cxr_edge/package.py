"""Model package: a directory with model.json and its artifacts. The one source of truth.

model.json (schema_version 1):
  name, task ("classification"), classes (ordered), normal_class (the class that is "no disease"),
  preprocess (PreprocessSpec), architecture ({name, head, in_channels, ...} for the torch reference),
  cam ({"features_output": "features", "kind": "gap_linear" | "gap_mlp"} when exported with features),
  provenance ({...free-form: training run, data, metrics, model card}),
  artifacts: [{file, sha256, bytes, format, precision, outputs,
               parity: {"<backend>/<precision>": {...}}, gate: {"<backend>/<precision>": {passed, ...}}}]
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .preprocess import PreprocessSpec

SCHEMA_VERSION = 1
MODEL_JSON = "model.json"
DEFAULT_PACKAGE = Path(__file__).parent / "models" / "default.cxrpkg"


class PackageError(Exception):
    """A model package is missing, malformed, or its files do not match model.json."""


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Artifact:
    file: str
    format: str
    precision: str
    sha256: str = ""
    bytes: int = 0
    outputs: list = field(default_factory=lambda: ["logits"])
    # Both keyed by "<backend>/<run precision>" (e.g. "openvino/bf16"): one artifact file runs on
    # several backends and precisions, and each combination is measured and gated on its own.
    parity: dict = field(default_factory=dict)   # measured against the torch fp32 reference
    gate: dict = field(default_factory=dict)     # {"passed": bool, "tolerance": {...}, "failures": [...]}
    extra: dict = field(default_factory=dict)    # e.g. quantization settings, ignored scope

    def passed_for(self, backend: str, precision: str) -> bool:
        return bool(self.gate.get(f"{backend}/{precision}", {}).get("passed"))

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("file", "sha256", "bytes", "format", "precision", "outputs", "parity", "gate", "extra")}


@dataclass
class ModelPackage:
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

    # -- lookup ---------------------------------------------------------------------------
    def artifact(self, precision: str, fmt: str | None = None) -> Artifact | None:
        for a in self.artifacts:
            if a.precision == precision and (fmt is None or a.format == fmt):
                return a
        return None

    def path(self, artifact: Artifact) -> Path:
        return self.root / artifact.file

    @property
    def disease_classes(self) -> list:
        return [c for c in self.classes if c != self.normal_class]

    # -- read ----------------------------------------------------------------------------
    @classmethod
    def read(cls, root: os.PathLike | None = None, verify: bool = True) -> "ModelPackage":
        root = Path(root) if root is not None else DEFAULT_PACKAGE
        meta_path = root / MODEL_JSON
        if not root.is_dir():
            raise PackageError(f"{root}: model package directory not found")
        if not meta_path.is_file():
            raise PackageError(f"{root}: no {MODEL_JSON} in the model package")
        try:
            meta = json.loads(meta_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PackageError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise PackageError(f"{meta_path}: top level must be an object")
        version = meta.get("schema_version")
        if not isinstance(version, int):
            raise PackageError(f"{meta_path}: schema_version missing or not an integer")
        if version > SCHEMA_VERSION:
            raise PackageError(f"{meta_path}: schema_version {version} is newer than this cxr-edge "
                               f"understands ({SCHEMA_VERSION}); upgrade cxr-edge")
        for key, typ in (("name", str), ("classes", list), ("preprocess", dict), ("artifacts", list)):
            if not isinstance(meta.get(key), typ):
                raise PackageError(f"{meta_path}: '{key}' missing or not a {typ.__name__}")
        classes = meta["classes"]
        if len(classes) < 2 or len(set(classes)) != len(classes) or not all(isinstance(c, str) and c for c in classes):
            raise PackageError(f"{meta_path}: 'classes' must be 2+ distinct non-empty names, got {classes}")
        normal = meta.get("normal_class")
        if normal is not None and normal not in classes:
            raise PackageError(f"{meta_path}: normal_class {normal!r} is not one of the classes {classes}")
        try:
            spec = PreprocessSpec.from_dict(meta["preprocess"])
        except (TypeError, ValueError) as e:
            raise PackageError(f"{meta_path}: bad preprocess spec: {e}") from None
        artifacts = []
        for i, a in enumerate(meta["artifacts"]):
            try:
                art = Artifact(**a)
            except TypeError as e:
                raise PackageError(f"{meta_path}: artifact #{i} malformed: {e}") from None
            if Path(art.file).name != art.file:
                raise PackageError(f"{meta_path}: artifact file {art.file!r} must be a plain name inside the package")
            if verify:
                p = root / art.file
                if not p.is_file():
                    raise PackageError(f"{root}: artifact {art.file} listed in {MODEL_JSON} is missing")
                digest = sha256_file(p)
                if digest != art.sha256:
                    raise PackageError(f"{root}: artifact {art.file} checksum mismatch "
                                       f"(model.json {art.sha256[:12]}…, file {digest[:12]}…): corrupted or replaced")
            artifacts.append(art)
        return cls(root=root, name=meta["name"], classes=list(classes), preprocess=spec, normal_class=normal,
                   architecture=meta.get("architecture", {}), cam=meta.get("cam", {}),
                   provenance=meta.get("provenance", {}), artifacts=artifacts, task=meta.get("task", "classification"))

    # -- write ---------------------------------------------------------------------------
    def add_artifact(self, artifact: Artifact) -> Artifact:
        """Register (or replace) an artifact whose file already sits in the package directory."""
        p = self.root / artifact.file
        artifact.sha256 = sha256_file(p)
        artifact.bytes = p.stat().st_size
        self.artifacts = [a for a in self.artifacts if a.file != artifact.file] + [artifact]
        return artifact

    def to_dict(self) -> dict:
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
        }

    def write(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for a in self.artifacts:  # checksums always describe the files as written
            p = self.root / a.file
            a.sha256, a.bytes = sha256_file(p), p.stat().st_size
        out = self.root / MODEL_JSON
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, out)
        return out
