"""Dataset adapters and patient-grouped splits.

Every adapter returns a list of `Sample(path, label, patient, source, view, mask, sublabel)`.
Supported layouts: our manifest.csv (../shared/data/cxr), class folders (DIR/<class>/*), Kermany
(chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}), COVID-19 Radiography Database
(<Class>/images + <Class>/masks, optionally under COVID-19_Radiography_Dataset/), and Cohen-style
metadata.csv. Labels are the layout's own names (folder names, "covid"/"normal"/"pneumonia" for
the manifest and Cohen, "normal"/"pneumonia" for Kermany); `map_labels` renames them to an
experiment's classes, by label or by "label/sublabel".
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
    sublabel: str = ""        # e.g. pneumonia: bacterial / viral (manifest, Kermany, Cohen)


def _images(d: Path):
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def load_manifest(root: Path) -> list[Sample]:
    out = []
    with open(root / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            out.append(Sample(str(root / r["path"]), r["label"], r.get("patient_id") or r["path"],
                              r.get("source", ""), r.get("view", ""), sublabel=r.get("sublabel", "")))
    return out


_KERMANY_PATIENT = re.compile(r"^(person\d+|IM-\d+|NORMAL2-IM-\d+)")


def load_kermany(root: Path) -> list[Sample]:
    base = root / "chest_xray" if (root / "chest_xray").is_dir() else root
    out = []
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            for p in _images(base / split / cls):
                m = _KERMANY_PATIENT.match(p.name)
                sub = "normal" if cls == "NORMAL" else ("bacterial" if "_bacteria" in p.name else
                                                        "viral" if "_virus" in p.name else "unknown")
                out.append(Sample(str(p), cls.lower(), "kermany_" + (m.group(1) if m else p.stem), "kermany",
                                  sublabel=sub))
    return out


def _radiography_root(root: Path) -> Path:
    """The folder holding <Class>/images: ROOT itself or its one sub-folder (the Kaggle zip unpacks
    to COVID-19_Radiography_Dataset/)."""
    if any((d / "images").is_dir() for d in root.iterdir() if d.is_dir()):
        return root
    subs = [d for d in root.iterdir() if d.is_dir()]
    if len(subs) == 1 and any((d / "images").is_dir() for d in subs[0].iterdir() if d.is_dir()):
        return subs[0]
    return root


def load_radiography(root: Path) -> list[Sample]:
    """COVID-19 Radiography Database: <Class>/images/<Class>-N.png with lung masks (256x256) in
    <Class>/masks/ under the same file name. The database has no patient ids: one id per image."""
    root = _radiography_root(root)
    out = []
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir() and (d / "images").is_dir()):
        masks = cls_dir / "masks"
        for p in _images(cls_dir / "images"):
            m = masks / p.name
            out.append(Sample(str(p), cls_dir.name, f"{cls_dir.name}/{p.stem}", "radiography",
                              mask=str(m) if m.is_file() else None))
    return out


_COHEN_PNEUMONIA = ("pneumonia", "sars", "mers", "streptococcus", "klebsiella", "mycoplasma", "legionella",
                    "e.coli", "chlamydophila", "pneumocystis", "influenza", "varicella", "lipoid", "bacterial",
                    "viral", "fungal", "aspergillosis", "nocardia", "herpes")


def cohen_label(finding: str) -> tuple[str, str]:
    """(label, sublabel) for a Cohen `finding` (both the 2020-03 names like "Streptococcus" and the
    later hierarchical ones like "Pneumonia/Bacterial/Streptococcus"). Findings that are not a
    pneumonia (ARDS alone, tuberculosis, "todo", "Unknown") keep their own text as label, so an
    experiment's class list drops them unless its label_map says otherwise."""
    f = finding.strip()
    low = f.lower()
    if "covid" in low:
        return "covid", "covid"
    if low.startswith("no finding") or low == "normal":
        return "normal", "normal"
    if any(k in low for k in _COHEN_PNEUMONIA):
        sub = ("fungal" if any(k in low for k in ("fungal", "pneumocystis", "aspergillosis")) else
               "viral" if any(k in low for k in ("viral", "sars", "mers", "influenza", "varicella", "herpes")) else
               "bacterial" if any(k in low for k in ("bacterial", "streptococcus", "klebsiella", "mycoplasma",
                                                      "legionella", "e.coli", "chlamydophila", "nocardia")) else
               "other" if "lipoid" in low else "unknown")
        return "pneumonia", sub
    return f, ""


def load_cohen(root: Path) -> list[Sample]:
    out = []
    with open(root / "metadata.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r.get("modality", "X-ray") != "X-ray":
                continue
            p = root / (r.get("folder") or "images") / r["filename"]
            label, sub = cohen_label(r.get("finding", ""))
            out.append(Sample(str(p), label, f"cohen_{r.get('patientid') or p.stem}", "cohen", r.get("view", ""),
                              sublabel=sub))
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
        elif _radiography_root(root) != root or any((d / "images").is_dir() for d in root.iterdir() if d.is_dir()):
            layout = "radiography"
        else:
            layout = "folders"
    loaders = {"manifest": load_manifest, "kermany": load_kermany, "radiography": load_radiography,
               "cohen": load_cohen, "folders": load_class_folders}
    if layout not in loaders:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(loaders)}")
    marker = {"manifest": "manifest.csv", "cohen": "metadata.csv"}.get(layout)
    if marker and not (root / marker).is_file():
        raise FileNotFoundError(f"{root}: no {marker}, which the {layout!r} layout needs; for class folders "
                                f"(<class>/<image>) use --layout folders or auto")
    return loaders[layout](root)


def map_labels(samples: list[Sample], mapping: dict | None) -> list[Sample]:
    """Rename labels (e.g. {"Viral Pneumonia": "pneumonia"}); a label mapped to None is dropped.

    A key "label/sublabel" (e.g. "pneumonia/viral") takes precedence over the plain label key, so
    our 3-class set maps onto the Radiography Database's 4 classes with
    {"pneumonia/viral": "Viral Pneumonia", "pneumonia": "Lung_Opacity", ...}."""
    if not mapping:
        return samples
    out = []
    for s in samples:
        key = f"{s.label}/{s.sublabel}"
        new = mapping[key] if key in mapping else mapping.get(s.label, s.label)
        if new is not None:
            out.append(Sample(s.path, new, s.patient, s.source, s.view, s.mask, s.sublabel))
    return out


def cap_per_class(samples: list[Sample], cap, seed: int = 0) -> list[Sample]:
    """At most `cap` images per class (an int, or {class: n}), taken by whole patients in a seeded
    order (e.g. Bansal & Sridhar's 70 COVID + 80 normal images)."""
    if not cap:
        return samples
    limits = cap if isinstance(cap, dict) else {}
    by_patient: dict[tuple, list[Sample]] = {}
    for s in samples:
        by_patient.setdefault((s.label, s.patient), []).append(s)
    taken: dict[str, int] = {}
    keep = set()
    for (label, pid) in sorted(by_patient, key=lambda k: _rank(k[1], seed)):
        n = limits.get(label) if isinstance(cap, dict) else int(cap)
        if n is None or taken.get(label, 0) + len(by_patient[(label, pid)]) <= int(n):
            keep.add((label, pid))
            taken[label] = taken.get(label, 0) + len(by_patient[(label, pid)])
    return [s for s in samples if (s.label, s.patient) in keep]


def _rank(patient: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{patient}".encode()).digest()[:8], "big")


def split_by_patient(samples: list[Sample], fractions=(0.8, 0.1, 0.1), seed: int = 0,
                     force_test_patients: set | None = None) -> dict[str, list[Sample]]:
    """Train/val/test split grouped by patient, stratified by (label, source), reproducible.

    Every image of a patient lands in one part. Within each stratum patients are ordered by a
    seeded hash and dealt out by the fractions. `force_test_patients` go to test (e.g. the
    repository's sample images, so the README never shows training images). Two fractions
    (e.g. Bansal & Sridhar's 80/20) give parts "train" and "test".
    """
    if len(fractions) not in (2, 3):
        raise ValueError(f"split needs 2 (train/test) or 3 (train/val/test) fractions, got {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    names = ("train", "val", "test") if len(fractions) == 3 else ("train", "test")
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
