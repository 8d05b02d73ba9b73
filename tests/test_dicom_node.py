"""DICOM results (classify --dicom-sr) and the DICOM node (serve-dicom) against real peers.

Every peer is real: pynetdicom SCUs send on loopback (127.0.0.1, ephemeral ports) to the running
node, a second pynetdicom Storage SCP receives forwarded SRs, and SRs are read back with pydicom
and highdicom. Images: DICOMs written here from samples/*.jpeg (always available) and the real
X-ray DICOMs in ../shared/data/cxr-dicom (skipped cleanly when absent). Nothing is mocked; no
timings are asserted (speed lives in bench)."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom", reason="pip install 'cxr-edge[dicom-node]'")
pytest.importorskip("highdicom", reason="pip install 'cxr-edge[dicom-node]'")

import pydicom  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402

from cxr_edge.dicom_node import (ACCEPTED_STORAGE, CANNOT_CLASSIFY, CANNOT_PARSE, COMPREHENSIVE_SR,  # noqa: E402
                                 DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES, DicomNode, parse_forward)
from cxr_edge.dicom_sr import read_sr_result, sr_filename  # noqa: E402

from conftest import CXR_DICOM, ROOT, sample_images  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
REAL_FILES = ["siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
              "udacity_test2.dcm", "udacity_test3.dcm"]       # three distinct real radiographs


# -- helpers ----------------------------------------------------------------------------------------
def dicom_from_jpeg(jpeg: Path, out: Path, study_uid: str | None = None, patient: str = "TEST^PATIENT") -> Path:
    """A 12-bit DX (for presentation) DICOM like a station sends, from one of the sample JPEGs."""
    from PIL import Image
    px = np.asarray(Image.open(jpeg).convert("L"), dtype=np.uint16) * 16      # 0..4080, BitsStored 12
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DX, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient, "PID-" + jpeg.stem[:20], "19700101", "O"
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "ACC1", "1", "20260101", "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PresentationIntentType, ds.ImageType = "FOR PRESENTATION", ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def with_new_uid(path: Path, out: Path) -> Path:
    """The same image as a new instance (new SOP Instance UID), for senders that need distinct ones."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def scu(port: int, ae_title: str = "STATION"):
    """An established association from a pynetdicom SCU to the node (CR/DX/SC in the syntaxes we send)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context("1.2.840.10008.1.1")
    for uid in (DX, CR, SC):
        for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit):
            ae.add_requested_context(uid, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXREDGE")
    assert assoc.is_established, "the node refused the association"
    return assoc


def real_files() -> list[Path]:
    files = [CXR_DICOM / "files" / n for n in REAL_FILES]
    return files if all(f.is_file() for f in files) else []


def need_real_files() -> list[Path]:
    files = real_files()
    if not files:
        pytest.skip(f"real DICOM X-rays not found at {CXR_DICOM} (../shared/data/cxr-dicom beside the checkout)")
    return files


def assert_sr_matches(sr_path: Path, source: Path, row: dict, classes):
    """The SR references `source`, copies its patient/study, and says what classify's CSV row says."""
    import highdicom as hd
    src = pydicom.dcmread(source, stop_before_pixels=True)
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.Modality == "SR"
    assert sr.StudyInstanceUID == src.StudyInstanceUID
    assert str(sr.PatientID) == str(src.get("PatientID", ""))
    assert str(sr.PatientName) == str(src.get("PatientName", ""))
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID                 # a series of its own, same study
    assert (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, src.SOPClassUID) in sr.get_evidence()
    got = read_sr_result(sr)
    assert got["source_sop_instance_uid"] == src.SOPInstanceUID
    assert got["source_sop_class_uid"] == src.SOPClassUID
    assert row["status"] == "ok"
    assert got["label"] == row["label"]
    for c in classes:
        assert got["probabilities"][c] == pytest.approx(float(row[f"p_{c}"]), abs=1e-6)
    assert abs(sum(got["probabilities"].values()) - 1) < 1e-6
    if row.get("uncertain") not in (None, ""):
        assert got["uncertain"] == (row["uncertain"].lower() == "true")
    # the document itself says what it is and is not
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    assert any("not for diagnostic use" in p for p in got["algorithm"]["parameters"])
    assert any(p.startswith("model.json sha256: ") and len(p.split()[-1]) == 64 for p in got["algorithm"]["parameters"])
    assert sr.VerificationFlag == "UNVERIFIED"
    return got


class Capture:
    """A second, real pynetdicom Storage SCP (the "PACS") that keeps every SR it is sent."""

    def __init__(self, status: int = 0x0000):
        self.received: list[Dataset] = []
        self.status = status
        ae = AE(ae_title="PACS")
        ae.add_supported_context(COMPREHENSIVE_SR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return self.status

    def close(self):
        self.server.shutdown()


class LogLines:
    """A text stream the node writes its JSON lines to; thread-safe enough for line writes."""

    def __init__(self):
        self.lines: list[dict] = []

    def write(self, s):
        for line in s.splitlines():
            if line.strip():
                self.lines.append(json.loads(line))

    def flush(self):
        pass

    def events(self, kind):
        return [x for x in self.lines if x["event"] == kind]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clf():
    """The default model on ONNX Runtime fp32 when present: it opens in ~1 s where auto's choice may
    first verify or compile (the node does not depend on the backend); else whatever auto picks."""
    import cxr_edge
    from cxr_edge.backends.base import BackendError
    try:
        c = cxr_edge.load(backend="onnxruntime", precision="fp32")
    except BackendError:
        c = cxr_edge.load()
    yield c
    c.close()


@pytest.fixture(scope="module")
def station_images(tmp_path_factory) -> list[Path]:
    """DX DICOMs written from two sample JPEGs (one normal, one pneumonia), in one study."""
    d = tmp_path_factory.mktemp("station")
    jpegs = [p for p in sample_images() if p.name.startswith("NORMAL2")][:1] + \
            [p for p in sample_images() if "bacteria" in p.name][:1]
    study = generate_uid()
    return [dicom_from_jpeg(j, d / f"{j.stem}.dcm", study_uid=study) for j in jpegs]


@pytest.fixture(scope="module")
def classified(clf, station_images, tmp_path_factory):
    """One `cxr-edge classify ... -o rows.csv --dicom-sr DIR` run over the station DICOMs, the real
    X-rays (when present) and one JPEG, on the node's backend/precision: (rows by path, SR folder)."""
    from cxr_edge.cli import main
    d = tmp_path_factory.mktemp("classify")
    files = [*station_images, *real_files(), sample_images()[0]]
    rc = main(["classify", *map(str, files), "-o", str(d / "rows.csv"), "--dicom-sr", str(d / "sr"),
               "--backend", clf.backend_name, "--precision", clf.precision])
    assert rc == 0
    with open(d / "rows.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r for r in csv.DictReader(f)}, d / "sr"


@pytest.fixture(scope="module")
def pacs():
    cap = Capture()
    yield cap
    cap.close()


@pytest.fixture(scope="module")
def node(clf, tmp_path_factory, pacs):
    """The node under test: stores SRs and forwards them to `pacs`."""
    out = tmp_path_factory.mktemp("sr")
    logs = LogLines()
    n = DicomNode(clf, host="127.0.0.1", port=0, store_sr=out, forward=("127.0.0.1", pacs.port, "PACS"),
                  log_stream=logs, queue_size=4).start()
    n.logs = logs
    yield n
    n.stop()


# -- tests ------------------------------------------------------------------------------------------
def test_parse_forward():
    assert parse_forward("pacs.local:104:PACS") == ("pacs.local", 104, "PACS")
    assert parse_forward("[::1]:11112:AE") == ("::1", 11112, "AE")
    for bad in ("pacs:104", "pacs:x:AE", "pacs:104:", "pacs:70000:AE", "pacs:104:THIS_AE_IS_TOO_LONG"):
        with pytest.raises(ValueError):
            parse_forward(bad)


def test_echo_and_store_station_dicoms(node, pacs, clf, station_images, classified):
    rows = classified[0]
    before = len(pacs.received)
    assoc = scu(node.port)
    try:
        assert assoc.send_c_echo().Status == 0
        for f in station_images:
            st = assoc.send_c_store(pydicom.dcmread(f))
            assert st.Status == 0, st.get("ErrorComment")
    finally:
        assoc.release()
    for f in station_images:
        sr_path = node.store_sr / sr_filename(pydicom.dcmread(f, stop_before_pixels=True))
        assert sr_path.is_file()
        assert_sr_matches(sr_path, f, rows[str(f)], clf.classes)
    # forwarded: the same documents reached the second SCP
    forwarded = pacs.received[before:]
    assert len(forwarded) == len(station_images)
    stored = {pydicom.dcmread(node.store_sr / sr_filename(pydicom.dcmread(f, stop_before_pixels=True))).SOPInstanceUID
              for f in station_images}
    assert {ds.SOPInstanceUID for ds in forwarded} == stored
    # one JSON line per image, with its latency
    lines = [x for x in node.logs.events("image") if x["sop_instance_uid"] in
             {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in station_images}]
    assert len(lines) == len(station_images)
    assert all(x["status"] == "0x0000" and x["forwarded"] is True and x["latency_ms"] > 0 for x in lines)
    assert node.logs.events("echo")


def test_real_xrays_from_shared_data(node, clf, classified):
    files = need_real_files()
    rows = classified[0]
    assoc = scu(node.port)
    try:
        for f in files:
            st = assoc.send_c_store(f)           # sent as stored: JPEG baseline and implicit VR as found
            assert st.Status == 0, st.get("ErrorComment")
    finally:
        assoc.release()
    for f in files:
        sr_path = node.store_sr / sr_filename(pydicom.dcmread(f, stop_before_pixels=True))
        assert_sr_matches(sr_path, f, rows[str(f)], clf.classes)


def _malformed_file(good: Path, out: Path) -> tuple[Path, str]:
    """Valid file meta and header, then a sequence whose item is garbage: no parser can read past it.
    Returns (path, its SOP Instance UID)."""
    ds = pydicom.dcmread(good, stop_before_pixels=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)        # read with stop_before_pixels: no PixelData yet
    with open(out, "ab") as f:     # explicit VR LE: (0040,0275) SQ, undefined length, then not an item
        f.write(b"\x40\x00\x75\x02SQ\x00\x00\xff\xff\xff\xff" + bytes(range(1, 9)) + b"garbage!")
    return out, str(ds.SOPInstanceUID)


def test_malformed_gets_failure_and_next_succeeds(node, station_images, tmp_path):
    from pynetdicom import _config
    good = station_images[0]
    no_pixels = pydicom.dcmread(good)
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_pixels.PixelData
    truncated = pydicom.dcmread(good)
    truncated.SOPInstanceUID = truncated.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
    unparsable, unparsable_uid = _malformed_file(good, tmp_path / "unparsable.dcm")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True      # send the file's bytes as they are, without decoding them
    assoc = scu(node.port)
    try:
        st = assoc.send_c_store(no_pixels)
        assert st.Status == DOES_NOT_MATCH_SOP_CLASS and "PixelData" in st.ErrorComment
        ok = assoc.send_c_store(with_new_uid(good, tmp_path / "g1.dcm"))
        assert ok.Status == 0
        st = assoc.send_c_store(truncated)
        assert st.Status == CANNOT_CLASSIFY and st.ErrorComment
        ok = assoc.send_c_store(with_new_uid(good, tmp_path / "g2.dcm"))
        assert ok.Status == 0
        st = assoc.send_c_store(unparsable)
        assert st.Status == CANNOT_PARSE, f"0x{st.Status:04X} {st.get('ErrorComment')}"
        ok = assoc.send_c_store(with_new_uid(good, tmp_path / "g3.dcm"))
        assert ok.Status == 0
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        if assoc.is_established:
            assoc.release()
    # each failure is logged with the SOP Instance UID it concerned; no SR was written for them
    failed = {x["sop_instance_uid"] for x in node.logs.lines if x["event"] in ("rejected", "image")
              and x["status"] != "0x0000"}
    assert {no_pixels.SOPInstanceUID, truncated.SOPInstanceUID} <= failed
    assert unparsable_uid in failed
    assert not (node.store_sr / f"SR_{truncated.SOPInstanceUID}.dcm").exists()


def test_two_senders_at_once(node, station_images, tmp_path):
    per_sender = 4
    files = {s: [with_new_uid(station_images[i % 2], tmp_path / f"{s}-{i}.dcm") for i in range(per_sender)]
             for s in ("A", "B")}
    statuses: dict = {}
    start = threading.Barrier(2)

    def send(name):
        assoc = scu(node.port, ae_title=f"STATION{name}")
        try:
            start.wait()
            statuses[name] = [assoc.send_c_store(f).Status for f in files[name]]
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(s,)) for s in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == {"A": [0] * per_sender, "B": [0] * per_sender}
    for name, fs in files.items():
        for f in fs:
            uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            got = read_sr_result(node.store_sr / f"SR_{uid}.dcm")
            assert got["source_sop_instance_uid"] == uid
            line = [x for x in node.logs.events("image") if x["sop_instance_uid"] == uid]
            assert len(line) == 1 and line[0]["calling_ae"] == f"STATION{name}"


def test_forward_failure_is_reported(clf, station_images, tmp_path):
    """A forward target that is down: the image gets 0xA700 and the log says why; the node keeps serving."""
    import socket
    with socket.socket() as s:           # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    logs = LogLines()
    with DicomNode(clf, host="127.0.0.1", port=0, forward=("127.0.0.1", dead, "NOBODY"), log_stream=logs) as n:
        assoc = scu(n.port)
        try:
            st = assoc.send_c_store(pydicom.dcmread(station_images[0]))
            assert st.Status == OUT_OF_RESOURCES and "forward" in st.ErrorComment
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
    (line,) = logs.events("image")
    assert line["forwarded"] is False and "NOBODY" in line["error"]


def test_classify_dicom_sr_cli(clf, station_images, classified, tmp_path):
    from cxr_edge.dicom_sr import SrWriter
    rows, out = classified
    dicoms = [*station_images, *real_files()]
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(sr_filename(pydicom.dcmread(f, stop_before_pixels=True)) for f in dicoms)
    assert names == expected                                   # deterministic names; no temporary files left
    for f in dicoms:
        assert_sr_matches(out / sr_filename(pydicom.dcmread(f, stop_before_pixels=True)), f, rows[str(f)], clf.classes)
    row = rows[str(sample_images()[0])]
    assert row["status"] == "ok"
    if "warnings" in row:                                       # the skip reason is in the row
        assert "not a DICOM file" in row["warnings"]
    # same image, same model and backend: the same SR instance UID (re-running replaces, never duplicates)
    again = SrWriter(tmp_path / "again", clf)
    for r in clf.predict(station_images):
        path, note = again.write(r)
        assert note is None
        assert pydicom.dcmread(path).SOPInstanceUID == pydicom.dcmread(out / path.name).SOPInstanceUID


def test_serve_dicom_command_sigterm(clf, station_images, tmp_path):
    """`cxr-edge serve-dicom` as a process: C-ECHO, C-STORE, then SIGTERM -> clean exit after the
    images it received; every image answered 0x0000 has its SR."""
    out = tmp_path / "sr"
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from cxr_edge.cli import main; sys.exit(main())",
                             "serve-dicom", "--host", "127.0.0.1", "--port", "0",
                             "--store-sr", str(out), "--ae-title", "CXREDGE",
                             "--backend", clf.backend_name, "--precision", clf.precision],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        start = json.loads(proc.stdout.readline())          # the first log line says where it listens
        assert start["event"] == "start" and start["ae_title"] == "CXREDGE"
        files = [with_new_uid(station_images[i % 2], tmp_path / f"s{i}.dcm") for i in range(6)]
        answered = {}

        def send():
            assoc = scu(start["port"])
            try:
                for f in files:
                    if not assoc.is_established:            # the node closed the link once it had finished
                        break
                    st = assoc.send_c_store(f)
                    answered[f] = st.Status if "Status" in st else None   # empty: aborted mid-request
                    if f is files[0]:
                        proc.send_signal(signal.SIGTERM)        # stop while the sender is still sending
            finally:
                if assoc.is_established:
                    assoc.release()

        t = threading.Thread(target=send)
        t.start()
        t.join(120)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    lines = [json.loads(x) for x in stdout.splitlines() if x.strip()]
    assert lines[-1]["event"] == "stop"
    assert answered[files[0]] == 0
    for f, status in answered.items():
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        if status == 0:
            assert read_sr_result(out / f"SR_{uid}.dcm")["source_sop_instance_uid"] == uid
        else:
            assert status in (None, OUT_OF_RESOURCES)
    assert "Traceback" not in stderr


def test_accepted_sop_classes():
    assert {CR, DX, "1.2.840.10008.5.1.4.1.1.1.1.1"} <= set(ACCEPTED_STORAGE)
