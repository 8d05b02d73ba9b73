"""Fixtures for the pytest-benchmark hot-path suite (`python -m pytest benchmarks/ --benchmark-json out.json`; kept out of the wheel and out of the unit-test run).

The model package comes from --bench-model PKG, else $CXR_EDGE_BENCH_MODEL, else the embedded
default package, else a DenseNet121 with random weights exported on the fly (a few minutes)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SHARED_DICOM = ROOT.parent / "shared" / "data" / "cxr-dicom" / "files"


def pytest_addoption(parser):
    parser.addoption("--bench-model", default=None, help="model package for the hot-path benchmarks")


def _random_package(out: Path) -> Path:
    """A random-weights DenseNet121 package at 224 px (the production input size), fp32 + int8."""
    pytest.importorskip("torch", reason="building a benchmark package needs the workbench (torch)")
    import torch

    from cxr_edge.export import ExportSettings, GateSettings, Int8Settings, export_checkpoint
    from cxr_edge.preprocess import PreprocessSpec
    from cxr_edge.train.checkpoint import save_checkpoint
    from cxr_edge.architectures import build
    torch.manual_seed(0)
    arch = {"name": "densenet121", "head": "linear", "num_classes": 3, "in_channels": 3, "dropout": 0.0,
            "input_size": 224}
    spec = PreprocessSpec(size=224, resize="stretch", channels=3)
    ckpt = out.parent / "random.safetensors"
    save_checkpoint(ckpt, build(arch).eval(), {"architecture": arch, "classes": ["covid", "normal", "pneumonia"],
                                               "normal_class": "normal", "preprocess": spec.to_dict(),
                                               "experiment": "bench-random"})
    export_checkpoint(ckpt, out, ExportSettings(precisions=("fp32", "int8"),
                                                gate=GateSettings(val=str(SAMPLES), keep_failed=True),
                                                int8=Int8Settings(calib=str(SAMPLES), calib_size=16)),
                      log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def bench_package(request, tmp_path_factory):
    from cxr_edge.package import DEFAULT_PACKAGE, ModelPackage
    path = request.config.getoption("--bench-model") or os.environ.get("CXR_EDGE_BENCH_MODEL")
    if not path and (DEFAULT_PACKAGE / "model.json").is_file():
        path = DEFAULT_PACKAGE
    if not path:
        path = _random_package(tmp_path_factory.mktemp("benchpkg") / "random.cxrpkg")
    return ModelPackage.read(path)


@pytest.fixture(scope="session")
def format_files(tmp_path_factory) -> dict:
    """One chest X-ray in each input format: the sample JPEG, PNG 8/16-bit, TIFF 16-bit, a 12-bit DICOM
    written here, and the real DICOM files beside the checkout when present."""
    from PIL import Image
    d = tmp_path_factory.mktemp("formats")
    jpeg = sorted(SAMPLES.glob("*.jpeg"))[0]
    img = Image.open(jpeg).convert("L")
    a8 = np.asarray(img)
    a16 = (a8.astype(np.uint16) * 257)
    out = {"jpeg": jpeg}
    img.save(d / "x8.png")
    out["png8"] = d / "x8.png"
    Image.fromarray(a16).save(d / "x16.png")
    out["png16"] = d / "x16.png"
    Image.fromarray(a16).save(d / "x16.tif")
    out["tiff16"] = d / "x16.tif"
    try:
        out["dicom12"] = _write_dicom(d / "x12.dcm", (a16 >> 4).astype(np.uint16))
    except ImportError:
        pass
    if (SHARED_DICOM / "udacity_test1.dcm").is_file():
        out["dicom8_real"] = SHARED_DICOM / "udacity_test1.dcm"
    jp = sorted(SHARED_DICOM.glob("siim_*.dcm")) if SHARED_DICOM.is_dir() else []
    if jp:
        out["dicom_jpeg_real"] = jp[0]
    return out


def _write_dicom(path: Path, pixels: np.ndarray) -> Path:
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = np.ascontiguousarray(pixels, "<u2").tobytes()
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True) if "enforce_file_format" in \
        pydicom.dcmwrite.__code__.co_varnames else ds.save_as(str(path), write_like_original=False)
    return path
