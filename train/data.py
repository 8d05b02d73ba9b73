"""Dataset adapters and patient-grouped splits.

Every adapter returns a list of `Sample(path, label, patient, source, view, mask)`. Supported
layouts: our manifest.csv (../shared/data/cxr), class folders (DIR/<class>/*), Kermany
(chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}), COVID-19 Radiography Database
(<Class>/images + <Class>/masks), and Cohen-style metadata.csv.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}


@dataclass(frozen=True)
class Sample:
    path: str
    label: str
    patient: str
    source: str = ""
    view: str = ""
    mask: str | None = None


def _images(d: Path):
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_manifest(root: Path) -> list[Sample]:
    out = []
    with open(root / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            out.append(Sample(str(root / r["path"]), r["label"], r.get("patient_id") or r["path"],
                              r.get("source", ""), r.get("view", "")))
    return out


_KERMANY_PATIENT = re.compile(r"^(person\d+|IM-\d+|NORMAL2-IM-\d+)")


def load_kermany(root: Path) -> list[Sample]:
    base = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    out = []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for p in _images(base / split / cls):
                m = _KERMANY_PATIENT.match(p.name)
                out.append(Sample(str(p), cls.lower(), m.group(1) if m else p.stem, "kermany"))
    return out


def load_radiography(root: Path) -> list[Sample]:
    out = []
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir() and (d / "images").is_dir()):
        masks = cls_dir / "masks"
        for p in _images(cls_dir / "images"):
            m = masks / p.name
            out.append(Sample(str(p), cls_dir.name, p.stem, "radiography", mask=str(m) if m.is_file() else None))
    return out


def load_cohen(root: Path) -> list[Sample]:
    out = []
    with open(root / "metadata.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r.get("modality", "X-ray") != "X-ray":
                continue
            p = root / "images" / r["filename"]
            finding = r.get("finding", "")
            label = "covid" if "COVID-19" in finding else ("normal" if finding.lower().startswith("no finding") else "pneumonia")
            out.append(Sample(str(p), label, f"cohen_{r.get('patientid', p.stem)}", "cohen", r.get("view", "")))
    return out


def load_class_folders(root: Path) -> list[Sample]:
    out = []
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for p in _images(cls_dir):
            out.append(Sample(str(p), cls_dir.name, p.stem, root.name))
    return out


def load_dataset(root, layout: str = "auto") -> list[Sample]:
    root = Path(root).resolve()  # split.json files must stay valid from any working directory
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset directory not found")
    if layout == "auto":
        if (root / "manifest.csv").is_file():
            layout = "manifest"
        elif (root / "metadata.csv").is_file():
            layout = "cohen"
        elif (root / "chest_xray").is_dir() or (root / "train" / "NORMAL").is_dir():
            layout = "kermany"
        elif any((d / "images").is_dir() for d in root.iterdir() if d.is_dir()):
            layout = "radiography"
        else:
            layout = "folders"
    loaders = {"manifest": load_manifest, "kermany": load_kermany, "radiography": load_radiography,
               "cohen": load_cohen, "folders": load_class_folders}
    if layout not in loaders:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(loaders)}")
    return loaders[layout](root)


def map_labels(samples: list[Sample], mapping: dict | None) -> list[Sample]:
    """Rename labels (e.g. {"Viral Pneumonia": "pneumonia"}); a label mapped to None is dropped."""
    if not mapping:
        return samples
    out = []
    for s in samples:
        new = mapping.get(s.label, s.label)
        if new is not None:
            out.append(Sample(s.path, new, s.patient, s.source, s.view, s.mask))
    return out


def _rank(patient: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{patient}".encode()).digest()[:8], "big")


def split_by_patient(samples: list[Sample], fractions=(0.8, 0.1, 0.1), seed: int = 0,
                     force_test_patients: set | None = None) -> dict[str, list[Sample]]:
    """Train/val/test split grouped by patient, stratified by (label, source), reproducible.

    Every image of a patient lands in one part. Within each stratum patients are ordered by a
    seeded hash and dealt out by the fractions. `force_test_patients` go to test (e.g. the
    repository's sample images, so the README never shows training images).
    """
    names = ("train", "val", "test")[:len(fractions)]
    force = force_test_patients or set()
    by_patient: dict[str, list[Sample]] = {}
    for s in samples:
        by_patient.setdefault(s.patient, []).append(s)
    strata: dict[tuple, list[str]] = {}
    parts = {n: [] for n in names}
    for pid, ss in by_patient.items():
        if pid in force:
            parts[names[-1]].extend(ss)
            continue
        strata.setdefault((ss[0].label, ss[0].source), []).append(pid)
    for key in sorted(strata):
        pids = sorted(strata[key], key=lambda p: _rank(p, seed))
        n = len(pids)
        bounds, acc = [], 0.0
        for frac in fractions[:-1]:
            acc += frac
            bounds.append(round(acc * n))
        for i, pid in enumerate(pids):
            part = next((names[j] for j, b in enumerate(bounds) if i < b), names[-1])
            parts[part].extend(by_patient[pid])
    return parts
