"""The full-size workload: what an X-ray station hands over, built from any radiographs.

`build(sources, out_dir, n)` writes, for each of n source images (JPEG/PNG radiographs, e.g. the
repository's samples/), three files of the same picture at station size (2048 x 2500 by default):

- ``dicom/NNN.dcm``: 12-bit CR, MONOCHROME1 (stored values inverted), Rescale Slope 1 / Intercept
  -1024, a linear window over the image's own range; uncompressed explicit VR little endian;
- ``png16/NNN.png``: 16-bit grayscale PNG (Pillow's default compression);
- ``jpeg/NNN.jpg``: 2 MP (1224 x 1632 at the default aspect) 8-bit JPEG, quality 90.

The pictures are the sources upsampled (bicubic) with deterministic low-bit noise so that the
12/16-bit files carry real entropy (a flat upsample compresses unrealistically well). Nothing is
written into the repository: the files go to `out_dir` (a temporary folder in the bench).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("dicom", "png16", "jpeg")
KIND_LABEL = {"dicom": "12-bit DICOM (MONOCHROME1, rescale + window)", "png16": "16-bit PNG",
              "jpeg": "2 MP JPEG"}
FULL_SIZE = (2048, 2500)   # (width, height)
JPEG_SIZE = (1224, 1632)   # about 2 MP, same aspect


def _station_pixels(src: Path, size, seed: int) -> np.ndarray:
    """float64 H x W in 0..1: the source radiograph at station size, with sensor-like noise."""
    with Image.open(src) as im:
        g = im.convert("L").resize(size, Image.BICUBIC)
    a = np.asarray(g, np.float64) / 255.0
    rng = np.random.default_rng(seed)
    a = a + rng.normal(0.0, 0.004, a.shape)
    return a.clip(0.0, 1.0)


def write_dicom(path: Path, stored: np.ndarray, window: tuple[float, float], intercept: float = -1024.0):
    """A minimal, valid 12-bit CR DICOM file (MONOCHROME1) holding `stored` (uint16 H x W)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "Synthetic^Bench"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, intercept, "US"
    ds.WindowCenter, ds.WindowWidth = f"{window[0]:.1f}", f"{window[1]:.1f}"
    ds.PixelData = np.ascontiguousarray(stored, "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def build(sources, out_dir, n: int = 4, size=FULL_SIZE) -> dict[str, list[str]]:
    """{kind: [file, ...]} for n pictures (cycling the sources), written under out_dir."""
    sources = [Path(s) for s in sources]
    if not sources:
        raise ValueError("full-size workload: no source radiographs")
    out = Path(out_dir)
    files = {k: [] for k in KINDS}
    for k in KINDS:
        (out / k).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = sources[i % len(sources)]
        a = _station_pixels(src, size, seed=i)
        # 12-bit MONOCHROME1: bright bone -> low stored value; window over the used range
        v12 = np.rint(a * 4095).astype(np.uint16)
        stored = (4095 - v12).astype(np.uint16)
        lo, hi = np.percentile(stored, [0.5, 99.5]) - 1024.0
        write_dicom(out / "dicom" / f"{i:03d}.dcm", stored, ((lo + hi) / 2, max(hi - lo, 2.0)))
        files["dicom"].append(str(out / "dicom" / f"{i:03d}.dcm"))
        p = out / "png16" / f"{i:03d}.png"
        Image.fromarray(np.rint(a * 65535).astype(np.uint16)).save(p)
        files["png16"].append(str(p))
        j = out / "jpeg" / f"{i:03d}.jpg"
        Image.fromarray(np.rint(a * 255).astype(np.uint8)).resize(JPEG_SIZE, Image.BILINEAR).save(j, quality=90)
        files["jpeg"].append(str(j))
    return files
