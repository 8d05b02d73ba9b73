"""Sink: a classification result as a DICOM Comprehensive SR (TID 1500 Measurement Report), via highdicom.

Why TID 1500 (PS3.16 A.1500) rather than a hand-made IHE AI Results (AIR) tree: the IHE AIR profile
itself encodes image-level findings and measurements as TID 1500 measurement groups, highdicom builds
and validates TID 1500 from typed templates, and viewers/archives that parse SR (OHIF, 3D Slicer/dcmqi,
PACS SR renderers) read TID 1500. So the document is AIR-compatible in its core without us
assembling content items by hand.

Document layout (one SR per source image, in the source's study, in a series of its own):

    Imaging Measurement Report (TID 1500)
      Language, Observation context: device observer = cxr-edge (TID 1004), Procedure reported = chest X-ray
      Imaging Measurements
        Measurement Group (TID 1501)
          Tracking identifier / UID; Algorithm identification (TID 4019): model name, version and
            parameters (model.json sha256, backend/precision, artifact, the "not for diagnostic use" notice)
          Source image: the referenced SOP Class/Instance UID of the classified image
          NUM "Probability of <class>" (unit UCUM "1") for every class, in model order
          NUM "Decision margin" when the Result has `margin`
          CODE Finding (DCM 121071) = predicted class (SNOMED CT where known, else scheme 99CXREDGE)
          CODE "Result uncertain" = Yes/No when the Result has `uncertain`
    Series Description: "cxr-edge AI result - NOT FOR DIAGNOSTIC USE"; Completion PARTIAL,
    Verification UNVERIFIED, Preliminary flag PRELIMINARY.

Patient/study modules are copied from the source header (highdicom's SR constructor); the source
instance and its series are referenced in the Current Requested Procedure Evidence Sequence.
UIDs are derived deterministically (pydicom `generate_uid(entropy_srcs=...)`, 2.25 root) from the
source SOP Instance UID + model.json digest + backend/precision, so classifying the same image with
the same model twice yields the same SR UID and file name (SR_<source SOPInstanceUID>.dcm).

Needs `pip install 'cxr-edge[dicom-node]'` (highdicom, pydicom); imported lazily by the CLI.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from .postprocess import DISCLAIMER

# highdicom warns when a copied Patient's Name has one component (e.g. an anonymised ID as name); the
# SR copies the source's name as it is, so that warning is noise here.
_PERSON_NAME_WARNING = r".*unlikely to represent the intended person name.*"

SCHEME = "99CXREDGE"                       # private coding scheme for model classes / our own concepts
SERIES_DESCRIPTION = "cxr-edge AI result - NOT FOR DIAGNOSTIC USE"   # LO: <= 64 characters
SERIES_NUMBER = 9901
NOT_DICOM = "not a DICOM file"

# Finding codes for class names we know; anything else is coded in the private scheme.
_KNOWN_FINDINGS = {
    "normal": ("17621005", "SCT", "Normal"),
    "pneumonia": ("233604007", "SCT", "Pneumonia"),
    "covid": ("840539006", "SCT", "COVID-19"),
    "covid-19": ("840539006", "SCT", "COVID-19"),
    "covid19": ("840539006", "SCT", "COVID-19"),
}
# Type 2 attributes highdicom reads from the source header with attribute access: present but empty
# when the source lacks them (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class SrError(Exception):
    """The source header cannot carry an SR (not DICOM, required UIDs missing); the message says why."""


def _hd():
    try:
        import highdicom
    except ImportError as e:
        raise ImportError(f"DICOM SR output needs highdicom: pip install 'cxr-edge[dicom-node]' ({e})") from None
    return highdicom


@dataclass
class AlgorithmInfo:
    """What produced the result: goes into TID 4019 Algorithm Identification and the device observer.

    Attributes: name (model name from model.json), version (cxr-edge version + model.json digest
    prefix), digest (sha256 hex of model.json: it lists the sha256 of every artifact, so it pins the
    whole package), backend/precision/artifact (what ran), classes (model order)."""
    name: str
    version: str
    digest: str
    backend: str
    precision: str
    artifact: str
    classes: list = field(default_factory=list)

    @classmethod
    def from_classifier(cls, clf) -> "AlgorithmInfo":
        """The AlgorithmInfo of an open Classifier: package name, model.json digest, backend, precision, artifact."""
        import cxr_edge
        from .package import MODEL_JSON, sha256_file
        pkg = clf.package
        digest = sha256_file(Path(pkg.root) / MODEL_JSON)
        artifact = getattr(getattr(clf.backend, "artifact", None), "file", "") or ""
        return cls(name=pkg.name, version=f"cxr-edge {cxr_edge.__version__}, model.json sha256:{digest[:16]}",
                   digest=digest, backend=clf.backend_name, precision=clf.precision, artifact=artifact,
                   classes=list(clf.classes))

    @property
    def parameters(self) -> list[str]:
        """TID 4019 Algorithm Parameters (DICOM PS3.16): model.json sha256, backend, precision, artifact, disclaimer."""
        return [f"model.json sha256: {self.digest}", f"backend: {self.backend}", f"precision: {self.precision}",
                f"artifact: {self.artifact}", DISCLAIMER]


# -- reading the source -----------------------------------------------------------------------
def read_header(source) -> Dataset:
    """The source's DICOM header (no pixel data). `source`: a path, Part 10 bytes, or a Dataset.

    Raises SrError when the input is not DICOM or lacks a UID the SR must reference."""
    if isinstance(source, Dataset):
        ds = source
    else:
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                fp, name = io.BytesIO(bytes(source)), "<bytes>"
                head = bytes(source[:132])
            else:
                name = str(source)
                with open(source, "rb") as f:
                    head = f.read(132)
                fp = source
            if head[128:132] != b"DICM" and Path(name).suffix.lower() not in (".dcm", ".dicom"):
                raise SrError(NOT_DICOM)
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
        except SrError:
            raise
        except Exception as e:
            raise SrError(f"DICOM header unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in _REQUIRED if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise SrError(f"DICOM header lacks {', '.join(missing)}")
    return ds


def _evidence(header: Dataset) -> Dataset:
    """A copy of the header that highdicom can read: Type 2 patient/study attributes present (empty if unknown)."""
    ev = Dataset()
    for elem in header:
        if elem.tag.group != 0x7FE0:           # never pixel data, even if the caller passed a full dataset
            ev.add(elem)
    ev.file_meta = getattr(header, "file_meta", Dataset())
    for k in _TYPE2:
        if k not in ev:
            setattr(ev, k, None)
    return ev


# -- building ---------------------------------------------------------------------------------
def _code_value(prefix: str, name: str) -> str:
    """A Code Value (SH: <= 16 characters, no backslash) for a class name in our private scheme: the
    name itself when it fits, else a digest of it (distinct names never share a code)."""
    import hashlib
    v = prefix + name.upper()
    if len(v) <= 16 and v.isascii() and v.isprintable() and "\\" not in v:
        return v
    return prefix + hashlib.sha256(name.encode()).hexdigest()[:16 - len(prefix)].upper()


def finding_code(name: str):
    """The coded value of a predicted class: SNOMED CT where we know it, else scheme 99CXREDGE."""
    from pydicom.sr.coding import Code
    v, scheme, meaning = _KNOWN_FINDINGS.get(name.lower(), (_code_value("", name), SCHEME, name[:64]))
    return Code(v, scheme, meaning)


def _probability_concept(cls_name: str):
    from pydicom.sr.coding import Code
    return Code(_code_value("P-", cls_name), SCHEME, f"Probability of {cls_name}"[:64])


UNCERTAIN_CONCEPT = ("UNCERTAIN", SCHEME, "Result uncertain")
MARGIN_CONCEPT = ("MARGIN", SCHEME, "Decision margin")


def sr_uids(header: Dataset, algo: AlgorithmInfo) -> tuple[str, str]:
    """(SR series UID, SR SOP instance UID), deterministic. One SR series per study and model run setup."""
    key = [algo.digest, algo.backend, algo.precision]
    series = generate_uid(entropy_srcs=[str(header.StudyInstanceUID), *key, "cxr-edge SR series"])
    inst = generate_uid(entropy_srcs=[str(header.SOPInstanceUID), *key, "cxr-edge SR"])
    return series, inst


def sr_filename(header: Dataset) -> str:
    """SR_<source SOPInstanceUID>.dcm: deterministic, and a UID has only digits and dots."""
    return f"SR_{header.SOPInstanceUID}.dcm"


def build_sr(header: Dataset, result, algo: AlgorithmInfo):
    """A highdicom ComprehensiveSR for one classified image.

    header: the source image's Dataset (pixel data not needed). result: an ok `Result` (label,
    probabilities; `margin`/`uncertain` used when present). Raises SrError for an error result or a
    header without the UIDs to reference."""
    hd = _hd()
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code
    if not getattr(result, "ok", False):
        raise SrError(f"no SR for a failed classification: {result.error}")
    header = read_header(header)
    ev = _evidence(header)
    series_uid, sop_uid = sr_uids(header, algo)
    algo_id = hd.sr.AlgorithmIdentification(
        name=algo.name, version=algo.version, parameters=algo.parameters, manufacturer="cxr-edge")
    classes = algo.classes or list(result.probabilities)
    measurements = [
        hd.sr.Measurement(name=_probability_concept(c), value=float(result.probabilities[c]),
                          unit=codes.UCUM.NoUnits)
        for c in classes]
    margin = getattr(result, "margin", None)
    if margin is not None:
        measurements.append(hd.sr.Measurement(name=Code(*MARGIN_CONCEPT), value=float(margin),
                                              unit=codes.UCUM.NoUnits))
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=finding_code(result.label))]
    uncertain = getattr(result, "uncertain", None)
    if uncertain is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=Code(*UNCERTAIN_CONCEPT), value=codes.SCT.Yes if uncertain else codes.SCT.No))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[sop_uid, "group"]), identifier="cxr-edge image classification"),
        algorithm_id=algo_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=header.SOPClassUID, referenced_sop_instance_uid=header.SOPInstanceUID)],
    )
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[algo.digest, "cxr-edge device"]), name="cxr-edge",
        manufacturer_name="cxr-edge", model_name=algo.name[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.cid270.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=Code("399208008", "SCT", "Plain chest X-ray"),
        imaging_measurements=[group])
    import cxr_edge
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING)
        return hd.sr.ComprehensiveSR(
            evidence=[ev], content=report[0], series_instance_uid=series_uid, series_number=SERIES_NUMBER,
            sop_instance_uid=sop_uid, instance_number=1, manufacturer="cxr-edge",
            is_complete=True, is_final=False, is_verified=False,
            series_description=SERIES_DESCRIPTION,
            manufacturer_model_name=algo.name[:64], software_versions=f"cxr-edge {cxr_edge.__version__}",
            coding_schemes=[CodingSchemeIdentificationItem(
                designator=SCHEME, name="cxr-edge model classes and result concepts")],
        )


# -- writing ----------------------------------------------------------------------------------
def write_atomic(ds: Dataset, folder: os.PathLike, name: str) -> Path:
    """Write `ds` as `folder/name` via a temporary file in the same folder + os.replace: a reader (a
    folder-watching PACS import) never sees a half-written file. Returns the final path."""
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            ds.save_as(f, enforce_file_format=True)
            f.flush()
            os.fsync(f.fileno())
        final = folder / name
        os.replace(tmp, final)
        return final
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -- reading back (tests, integrators) ---------------------------------------------------------
def read_sr_result(sr) -> dict:
    """What an SR written here says: {"source_sop_instance_uid", "source_sop_class_uid", "label",
    "probabilities": {class: p}, "uncertain": bool|None, "margin": float|None, "algorithm": {...}}.
    `sr`: a path or Dataset of an SR produced by `build_sr`."""
    ds = sr if isinstance(sr, Dataset) else pydicom.dcmread(sr)
    out = {"probabilities": {}, "label": None, "uncertain": None, "margin": None, "algorithm": {}}

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in it else None
            meaning = str(name.CodeMeaning) if name is not None else ""
            vt = it.ValueType
            if vt == "NUM" and meaning.startswith("Probability of "):
                out["probabilities"][meaning[len("Probability of "):]] = float(
                    it.MeasuredValueSequence[0].NumericValue)
            elif vt == "NUM" and meaning == MARGIN_CONCEPT[2]:
                out["margin"] = float(it.MeasuredValueSequence[0].NumericValue)
            elif vt == "CODE" and meaning == "Finding":
                out["label_code"] = str(it.ConceptCodeSequence[0].CodeMeaning)
            elif vt == "CODE" and meaning == UNCERTAIN_CONCEPT[2]:
                out["uncertain"] = str(it.ConceptCodeSequence[0].CodeValue) == "373066001"
            elif vt == "IMAGE":
                ref = it.ReferencedSOPSequence[0]
                out["source_sop_instance_uid"] = str(ref.ReferencedSOPInstanceUID)
                out["source_sop_class_uid"] = str(ref.ReferencedSOPClassUID)
            elif vt == "TEXT" and meaning in ("Algorithm Name", "Algorithm Version"):
                out["algorithm"][meaning] = str(it.TextValue)
            elif vt == "TEXT" and meaning == "Algorithm Parameters":
                out["algorithm"].setdefault("parameters", []).append(str(it.TextValue))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(ds.ContentSequence)
    code = out.pop("label_code", None)
    if code is not None:
        # the Finding is coded (SNOMED CT where known); map its meaning back to the model's class name
        names = {finding_code(c).meaning: c for c in out["probabilities"]}
        out["label"] = names.get(code, code)
    # The algorithm items repeat per measurement; keep each parameter once, in order.
    if "parameters" in out["algorithm"]:
        out["algorithm"]["parameters"] = list(dict.fromkeys(out["algorithm"]["parameters"]))
    return out


# -- the classify --dicom-sr sink ----------------------------------------------------------------
class SrWriter:
    """`cxr-edge classify --dicom-sr DIR`: one SR per classified DICOM input, in DIR.

    write(result) -> (path or None, note or None). Never raises for a per-input problem: a non-DICOM
    input or a failed classification returns a note saying why no SR was written (the CLI puts it in
    the row's warnings when the Result has that field, else on stderr)."""

    def __init__(self, folder: os.PathLike, clf):
        _hd()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.algo = AlgorithmInfo.from_classifier(clf)
        self.written = 0
        self.skipped = 0
        self._seen: dict[str, str] = {}   # file name -> source path, to flag duplicate SOP Instance UIDs

    def write(self, result) -> tuple[Path | None, str | None]:
        """Write the SR for one Result to SR_<SOPInstanceUID>.dcm in the folder (atomically).

        Returns (path, note): note is set when an earlier input had the same SOPInstanceUID (replaced);
        (None, "dicom-sr: ...") when no SR was written (failed result, non-DICOM input, build or write error).
        """
        try:
            if not result.ok:
                raise SrError("classification failed")
            header = read_header(result.source)
            name = sr_filename(header)
            note = None
            if name in self._seen and self._seen[name] != result.source:
                note = (f"dicom-sr: {self._seen[name]} has the same SOPInstanceUID; "
                        f"{name} now holds this input's result")
            sr = build_sr(header, result, self.algo)
            path = write_atomic(sr, self.folder, name)
        except SrError as e:
            self.skipped += 1
            return None, f"dicom-sr: no SR ({e})"
        except OSError as e:
            self.skipped += 1
            return None, f"dicom-sr: SR not written ({e.strerror or e})"
        except Exception as e:   # highdicom validation of a header it dislikes: the input's note, not a crash
            self.skipped += 1
            return None, f"dicom-sr: SR not built ({type(e).__name__}: {e})"
        self._seen[name] = result.source
        self.written += 1
        return path, note

    def summary(self) -> str:
        """One line for the end of the run: SRs written (and replaced), inputs without an SR."""
        files = len(self._seen)
        dup = f" ({self.written - files} replaced an SR of the same SOPInstanceUID)" if files < self.written else ""
        return (f"--dicom-sr: {self.written} SR written to {self.folder}{dup}, "
                f"{self.skipped} inputs without SR (see their rows)")


def note_on_result(result, note: str | None):
    """Attach a per-input note: into `result.warnings` when the Result has that list (row column),
    otherwise one line on stderr."""
    if not note:
        return
    warnings = getattr(result, "warnings", None)
    if isinstance(warnings, list):
        warnings.append(note)
    else:
        print(f"cxr-edge: {result.source}: {note}", file=sys.stderr)
