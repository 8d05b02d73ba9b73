"""Latency of the DICOM node: receive -> SR written, per image, over real loopback associations.

    python -m cxr_edge.bench.dicom_node --workload real --images 60
    python -m cxr_edge.bench.dicom_node --workload station --images 60 --senders 2

Workloads (files go to a temporary folder, never into the repository):
  real     the distinct real radiograph DICOMs of ../shared/data/cxr-dicom (1024 x 1024, 8-bit, SC;
           one JPEG-baseline), cycled, each send a new SOP Instance UID;
  station  station-size 12-bit DX (2048 x 2500, explicit VR LE, ~10 MB) from distinct real X-rays
           of ../shared/data/cxr, upsampled bicubic (the size and bit depth a station sends).
The node runs in this process (as `serve-dicom` does) with --store-sr to a temporary folder; each
sender is a pynetdicom SCU on its own association, sending one C-STORE after the other (so with one
sender the latency has no queueing in it). Numbers come from the node's own JSON log lines
(latency_ms = handler entry with the complete data set -> SR file renamed into place).
Prints one JSON object: percentiles per field, throughput, batch sizes, cores and load average.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


class _Lines(io.StringIO):
    def __init__(self):
        super().__init__()
        self.records = []
        self.lock = threading.Lock()

    def write(self, s):
        with self.lock:
            for line in s.splitlines():
                if line.strip():
                    self.records.append(json.loads(line))
        return len(s)


def _real_files(shared: Path) -> list[Path]:
    import pydicom
    files, seen = [], set()
    for f in sorted((shared / "cxr-dicom" / "files").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        key = (ds.SOPInstanceUID, ds.get("PhotometricInterpretation"))
        if ds.get("Modality") in ("CR", "DX") and key not in seen and ds.SOPInstanceUID not in {k[0] for k in seen}:
            seen.add(key)
            files.append(f)
    if not files:
        raise SystemExit(f"no real DICOM X-rays in {shared / 'cxr-dicom'}")
    return files


def _station_files(shared: Path, n: int, out: Path) -> list[Path]:
    """n 12-bit DX files at 2048 x 2500 from n distinct real X-rays (../shared/data/cxr)."""
    import csv
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    with open(shared / "cxr" / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("view") != "L"]
    rng = np.random.default_rng(0)
    pick = [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]
    study = generate_uid()
    files = []
    for i, r in enumerate(pick):
        with Image.open(shared / "cxr" / r["path"]) as im:
            a = np.asarray(im.convert("L").resize((2048, 2500), Image.BICUBIC), np.float64) / 255.0
        a = (a + rng.normal(0, 0.004, a.shape)).clip(0, 1)
        px = np.rint(a * 4095).astype("<u2")
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.PatientName, ds.PatientID = "Bench^Station", f"BENCH{i:03d}"
        ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
        ds.Rows, ds.Columns = px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = px.tobytes()
        p = out / f"station-{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def _pct(values) -> dict | None:
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return None
    return {"n": int(len(v)), "p50": round(float(np.percentile(v, 50)), 1), "p90": round(float(np.percentile(v, 90)), 1),
            "p99": round(float(np.percentile(v, 99)), 1), "mean": round(float(v.mean()), 1),
            "max": round(float(v.max()), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.bench.dicom_node", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=["real", "station"], default="real")
    ap.add_argument("--images", type=int, default=60, help="images per sender (default 60)")
    ap.add_argument("--senders", type=int, default=1, help="concurrent SCUs, each on its own association")
    ap.add_argument("--shared", default=str(SHARED), help="the ../shared/data folder")
    ap.add_argument("--model")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sample-sr", metavar="FILE", help="also copy one SR written from a real X-ray here")
    args = ap.parse_args(argv)

    import logging
    import shutil
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    import cxr_edge
    from cxr_edge.dicom_node import DicomNode
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    shared = Path(args.shared)
    with tempfile.TemporaryDirectory(prefix="cxr-dicom-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.workload == "real":
            base = _real_files(shared)
            sources = [base[i % len(base)] for i in range(args.images)]
        else:
            sources = _station_files(shared, args.images, tmp)
        prepare_s = time.perf_counter() - t0
        datasets = {s: [pydicom.dcmread(f) for f in sources] for s in range(args.senders)}
        for dsets in datasets.values():
            for ds in dsets:
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        clf = cxr_edge.load(args.model, backend=args.backend, precision=args.precision, batch_size=args.batch_size)
        logs = _Lines()
        statuses = {}
        with DicomNode(clf, host="127.0.0.1", port=0, store_sr=tmp / "sr", log_stream=logs) as node:
            def send(k):
                ae = AE(ae_title=f"BENCH{k}")
                contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets[k]}
                for uid, ts in contexts:
                    ae.add_requested_context(uid, ts)
                assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
                statuses[k] = [int(assoc.send_c_store(ds).Status) for ds in datasets[k]]
                assoc.release()

            import resource
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t1 = time.perf_counter()
            threads = [threading.Thread(target=send, args=(k,)) for k in range(args.senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t1
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            if args.sample_sr and args.workload == "real":
                first = [r for r in logs.records if r["event"] == "image" and r.get("sr")]
                if first:
                    shutil.copyfile(first[0]["sr"], args.sample_sr)
        images = [r for r in logs.records if r["event"] == "image"]
        n = sum(len(v) for v in statuses.values())
        report = {
            "workload": args.workload, "senders": args.senders, "images": n,
            "ok": sum(s == 0 for v in statuses.values() for s in v),
            "backend": clf.backend_name, "precision": clf.precision, "batch_size": args.batch_size,
            "cores": len(os.sched_getaffinity(0)), "loadavg_after": os.getloadavg(),
            "prepare_s": round(prepare_s, 1), "wall_s": round(wall, 2), "images_per_s": round(n / wall, 2),
            # CPU time of this process (node + in-process SCU) per image: what the node costs whatever
            # else runs on the machine; the wall-clock latencies below include waiting for a core
            "cpu_ms_per_image": round(cpu_s / max(n, 1) * 1e3, 1),
            "latency_ms": _pct(r["latency_ms"] for r in images),
            "total_ms": _pct(r["total_ms"] for r in images),
            "queue_ms": _pct(r["queue_ms"] for r in images),
            "classify_ms_per_batch": _pct(r["classify_ms"] for r in images),
            "sr_ms": _pct(r["sr_ms"] for r in images),
            "batch_sizes": {str(b): sum(r["batch"] == b for r in images) for b in sorted({r["batch"] for r in images})},
        }
        clf.close()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
