"""DICOM decoding: variants written with pydicom from a real radiograph, and the real DICOM files
in ../shared/data/cxr-dicom. Each variant must decode to the picture its header describes and
classify like the same picture as PNG."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless,  # noqa: E402
                         generate_uid)

import cxr_edge  # noqa: E402
from cxr_edge.decode import MAX_PIXELS, DecodeError, decode  # noqa: E402

from conftest import CXR_DICOM, SAMPLES  # noqa: E402

SAMPLE = SAMPLES / "person1950_bacteria_4881.jpeg"
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"        # Digital X-Ray Image Storage - For Presentation
FILES = CXR_DICOM / "files"
SIIM = FILES / "siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
SIIM_MONO1 = FILES / "siim_Fake_MONOHR1.dcm"


def need_dicom_files():
    if not (FILES / "udacity_test1.dcm").is_file():
        pytest.skip(f"real DICOM samples not found at {FILES} (../shared/data/cxr-dicom beside the checkout)")


@pytest.fixture(scope="module")
def gray8() -> np.ndarray:
    with Image.open(SAMPLE) as im:
        return np.asarray(im.convert("L").resize((314, 216), Image.BILINEAR)).copy()


def make_dicom(arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 8, modality: str = "DX",
               **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_SOP
    ds.SOPClassUID = DX_SOP
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.PatientID = "cxr-edge-test"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.set_pixel_data(arr, photometric, bits_stored)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write(ds: Dataset, path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return str(path)


@pytest.fixture(scope="module")
def variants(tmp_path_factory, gray8) -> dict:
    """name -> path of DICOM files that all show the same picture as the PNG (`png`)."""
    d = tmp_path_factory.mktemp("dicom")
    g = gray8
    out = {}
    Image.fromarray(g).save(d / "ref.png")
    out["png"] = str(d / "ref.png")
    out["mono2_8bit"] = write(make_dicom(g), d / "mono2_8bit.dcm")
    # MONOCHROME1, 12 bits stored in 16, with a rescale: stored = (1 - g) * 4095, HU-like = 2 * stored - 1024
    stored = np.round((1.0 - g / 255.0) * 4095).astype(np.uint16)
    out["mono1_12bit_rescale"] = write(make_dicom(stored, "MONOCHROME1", 12, RescaleSlope=2, RescaleIntercept=-1024),
                                       d / "mono1_12bit.dcm")
    # A VOI window over part of a 12-bit range (without it the picture would span 1000/4095..3040/4095)
    w12 = (1000 + g.astype(np.uint16) * 8)
    ds = make_dicom(w12, "MONOCHROME2", 12, WindowCenter=1000 + 255 * 8 / 2 + 0.5, WindowWidth=255 * 8 + 1)
    out["window"] = write(ds, d / "window.dcm")
    # A VOI LUT sequence (12-bit in, 8-bit out): entries 0..4095 -> value // 16
    ds = make_dicom(g.astype(np.uint16) * 16 + 7, "MONOCHROME2", 12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new(0x00283006, "US", [i // 16 for i in range(4096)])  # LUTData
    ds.VOILUTSequence = Sequence([item])
    out["voi_lut"] = write(ds, d / "voi_lut.dcm")
    ds = make_dicom(g)
    ds.compress(RLELossless)
    out["rle_8bit"] = write(ds, d / "rle_8bit.dcm")
    ds = make_dicom(stored, "MONOCHROME1", 12, RescaleSlope=2, RescaleIntercept=-1024)
    ds.compress(RLELossless)
    out["rle_12bit_mono1"] = write(ds, d / "rle_12bit_mono1.dcm")
    try:
        ds = make_dicom(stored, "MONOCHROME1", 12)
        ds.compress(JPEG2000Lossless)
        out["j2k_12bit_mono1"] = write(ds, d / "j2k.dcm")
    except Exception as e:  # encoder plugin (pylibjpeg-openjpeg) not installed
        out["j2k_12bit_mono1"] = f"skip: JPEG 2000 encoder unavailable ({e})"
    try:
        ds = make_dicom(g)
        ds.compress(JPEGLSLossless)
        out["jpegls_8bit"] = write(ds, d / "jpegls.dcm")
    except Exception as e:  # pyjpegls not installed
        out["jpegls_8bit"] = f"skip: JPEG-LS encoder unavailable ({e})"
    return out


def _variant(variants, name):
    v = variants[name]
    if v.startswith("skip:"):
        pytest.skip(v[5:])
    return v


ALL = ["mono2_8bit", "mono1_12bit_rescale", "window", "voi_lut", "rle_8bit", "rle_12bit_mono1",
       "j2k_12bit_mono1", "jpegls_8bit"]


@pytest.mark.parametrize("name", ALL)
def test_variant_decodes_to_the_picture(variants, gray8, name):
    path = _variant(variants, name)
    d = decode(path)
    ref = gray8.astype(np.float32) / 255
    assert d.pixels.dtype == np.float32 and d.pixels.shape == gray8.shape
    assert d.meta["format"] == "DICOM"
    diff = np.abs(d.pixels - ref)
    if name == "window":
        assert d.meta["window"] == (1000 + 255 * 8 / 2 + 0.5, 255 * 8 + 1)
    if name == "voi_lut":
        assert d.meta.get("voi_lut")
    # 8-bit variants are exact; 12-bit ones are within their own quantisation step
    tol = 1e-6 if name in ("mono2_8bit", "rle_8bit", "jpegls_8bit", "voi_lut", "window") else 0.6 / 4095 + 1e-6
    assert float(diff.max()) <= tol, f"{name}: max |diff| {diff.max():.2e}"


def test_dicom_bytes_input(variants):
    path = _variant(variants, "rle_12bit_mono1")
    data = open(path, "rb").read()
    assert np.array_equal(decode(data).pixels, decode(path).pixels)


def test_dicom_without_extension_is_sniffed(variants, tmp_path):
    src = _variant(variants, "mono2_8bit")
    p = tmp_path / "IM0001"
    p.write_bytes(open(src, "rb").read())
    assert np.array_equal(decode(p).pixels, decode(src).pixels)


def test_rgb_and_ybr_secondary_capture(tmp_path, gray8):
    """Colour secondary captures of a radiograph (YBR_FULL, RGB) decode to the same gray picture."""
    rgb = np.dstack([gray8] * 3)
    ds = make_dicom(rgb, "RGB", 8, modality="OT")
    a = decode(write(ds, tmp_path / "rgb.dcm")).pixels
    np.testing.assert_allclose(a, gray8 / 255.0, atol=1e-6)
    # YBR_FULL stored: Y = gray, Cb = Cr = 128 (pydicom 3 returns it as RGB; it must not be converted twice)
    ybr = np.dstack([gray8, np.full_like(gray8, 128), np.full_like(gray8, 128)])
    ds = make_dicom(ybr, "YBR_FULL", 8, modality="OT")
    b = decode(write(ds, tmp_path / "ybr.dcm")).pixels
    assert float(np.abs(b - gray8 / 255.0).max()) <= 1.5 / 255


def test_window_variants(tmp_path, gray8):
    g12 = (1000 + gray8.astype(np.uint16) * 8)
    c, w = 1000 + 255 * 8 / 2, 255 * 8
    # values outside the window clip to black / white
    edged = g12.copy()
    edged[:4], edged[-4:] = 0, 4095
    clip = decode(write(make_dicom(edged, "MONOCHROME2", 12, WindowCenter=c + 0.5, WindowWidth=w + 1),
                        tmp_path / "clip.dcm")).pixels
    assert (clip[:4] == 0).all() and (clip[-4:] == 1).all()
    np.testing.assert_allclose(clip[4:-4], gray8[4:-4] / 255.0, atol=1e-6)
    exact = decode(write(make_dicom(g12, "MONOCHROME2", 12, WindowCenter=c, WindowWidth=w,
                                    VOILUTFunction="LINEAR_EXACT"), tmp_path / "le.dcm"))
    np.testing.assert_allclose(exact.pixels, (g12 - c) / w + 0.5, atol=1e-6)
    sig = decode(write(make_dicom(g12, "MONOCHROME2", 12, WindowCenter=c, WindowWidth=w, VOILUTFunction="SIGMOID"),
                       tmp_path / "sig.dcm"))
    np.testing.assert_allclose(sig.pixels, 1 / (1 + np.exp(-4 * (g12 - c) / w)), atol=1e-6)
    # multi-valued window: the first pair applies
    multi = decode(write(make_dicom(g12, "MONOCHROME2", 12, WindowCenter=[c + 0.5, 10], WindowWidth=[w + 1, 5]),
                         tmp_path / "multi.dcm"))
    np.testing.assert_allclose(multi.pixels, gray8 / 255.0, atol=1e-6)
    # width 1 is a threshold, not a division by zero
    thr = decode(write(make_dicom(g12, "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=1), tmp_path / "thr.dcm"))
    assert np.isfinite(thr.pixels).all() and set(np.unique(thr.pixels)) <= {0.0, 1.0}
    bad = write(make_dicom(g12, "MONOCHROME2", 12, WindowCenter=2000, WindowWidth=0), tmp_path / "bad.dcm")
    with pytest.raises(DecodeError, match="window width 0.0 is invalid"):
        decode(bad)


def test_dicom_classifies_like_png(tiny_package, variants):
    names = [n for n in ALL if not variants[n].startswith("skip:")]
    with cxr_edge.load(tiny_package, backend="openvino", precision="fp32") as clf:
        res = clf.predict([variants["png"]] + [variants[n] for n in names])
    ref = res[0]
    assert ref.ok, ref.error
    for n, r in zip(names, res[1:]):
        assert r.ok, f"{n}: {r.error}"
        assert r.label == ref.label, n
        dp = max(abs(r.probabilities[c] - ref.probabilities[c]) for c in ref.probabilities)
        assert dp <= 1e-3, f"{n}: max |dp| {dp:.2e} against the PNG"


# -- refused DICOM files ---------------------------------------------------------------------------
def test_multiframe_refused(tmp_path, gray8):
    ds = make_dicom(np.stack([gray8, gray8]), "MONOCHROME2", 8)
    assert int(ds.NumberOfFrames) == 2
    p = write(ds, tmp_path / "cine.dcm")
    with pytest.raises(DecodeError, match=r"cine\.dcm: multi-frame DICOM \(2 frames\)"):
        decode(p)


def test_oversized_header_refused_before_decoding(tmp_path, gray8):
    ds = make_dicom(gray8)
    ds.compress(RLELossless)
    ds.Rows, ds.Columns = 20000, 20000                 # a compressed stream can claim any size
    p = write(ds, tmp_path / "huge.dcm")
    assert 20000 * 20000 > MAX_PIXELS
    with pytest.raises(DecodeError, match="20000x20000 pixels exceeds the decompression-bomb limit"):
        decode(p)


def test_not_dicom_with_dcm_suffix(tmp_path):
    p = tmp_path / "fake.dcm"
    p.write_bytes(b"\0" * 200 + b"not a dicom file")
    with pytest.raises(DecodeError, match=r"fake\.dcm: not a readable DICOM file"):
        decode(p)


# -- the real DICOM files ---------------------------------------------------------------------------
def test_real_uncompressed_8bit_dx():
    need_dicom_files()
    d = decode(FILES / "udacity_test1.dcm")
    assert d.pixels.shape == (1024, 1024) and d.meta["modality"] == "DX" and d.meta["bits_stored"] == 8
    ds = pydicom.dcmread(FILES / "udacity_test1.dcm")
    assert np.array_equal(d.pixels, ds.pixel_array.astype(np.float32) / 255)
    assert 0.2 < float(d.pixels.mean()) < 0.9 and float(d.pixels.std()) > 0.05   # a picture, not a blank
    # header-edited copies of the same pixels (body part RIBCAGE, position XX) decode identically
    for other in ("udacity_test4.dcm", "udacity_test6.dcm"):
        assert np.array_equal(decode(FILES / other).pixels, d.pixels), other


def test_real_jpeg_baseline_and_monochrome1_copy():
    need_dicom_files()
    a = decode(SIIM)
    assert a.meta["transfer_syntax"] == "1.2.840.10008.1.2.4.50" and a.meta["photometric"] == "MONOCHROME2"
    assert a.pixels.shape == (1024, 1024) and float(a.pixels.std()) > 0.05
    b = decode(SIIM_MONO1)
    assert b.meta["photometric"] == "MONOCHROME1"
    # the upstream copy changed only the header: its decoded picture is the inverse of the original
    np.testing.assert_allclose(b.pixels, 1.0 - a.pixels, atol=1e-6)
    assert not np.allclose(a.pixels, b.pixels)


def test_real_ct_refused():
    need_dicom_files()
    with pytest.raises(DecodeError, match=r"udacity_test5\.dcm: modality CT is not a radiograph"):
        decode(FILES / "udacity_test5.dcm")


def test_real_dicom_classified(tiny_package):
    need_dicom_files()
    paths = [FILES / "udacity_test1.dcm", SIIM, SIIM_MONO1, FILES / "udacity_test5.dcm"]
    with cxr_edge.load(tiny_package, backend="onnxruntime", precision="fp32") as clf:
        res = clf.predict(paths)
    assert [r.ok for r in res] == [True, True, True, False]
    assert all(abs(sum(r.probabilities.values()) - 1) < 1e-5 for r in res[:3])
    assert "modality CT" in res[3].error and "udacity_test5.dcm" in res[3].error


MISSING_PLUGIN = textwrap.dedent("""
    import sys
    # Pretend the optional decoders are not installed: the import of each fails, as it would.
    for m in ("pylibjpeg", "libjpeg", "openjpeg", "rle", "jpeg_ls", "gdcm"):
        sys.modules[m] = None
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGBaseline8Bit, JPEG2000Lossless
    for ts in (JPEGBaseline8Bit, JPEG2000Lossless):
        dec = get_decoder(ts)
        if "pillow" in dec.available_plugins:
            dec.remove_plugin("pillow")      # a Pillow build without JPEG / JPEG 2000 codecs
    from cxr_edge.decode import DecodeError, decode
    for p in sys.argv[1:]:
        try:
            decode(p)
            print("DECODED", p)
        except DecodeError as e:
            print("ERROR", e)
""")


def test_missing_pixel_data_plugin_named(variants):
    need_dicom_files()
    files = [str(SIIM)]
    if not variants["j2k_12bit_mono1"].startswith("skip:"):
        files.append(variants["j2k_12bit_mono1"])
    files.append(variants["rle_8bit"])          # RLE is pydicom's own: still decodes
    r = subprocess.run([sys.executable, "-c", MISSING_PLUGIN, *files], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(files), r.stdout + r.stderr
    assert lines[0].startswith("ERROR") and "JPEG Baseline (Process 1)" in lines[0] and "pylibjpeg" in lines[0]
    assert "pip install" in lines[0]
    if len(files) == 3:
        assert lines[1].startswith("ERROR") and "JPEG 2000" in lines[1] and "pylibjpeg" in lines[1]
    assert lines[-1].startswith("DECODED")
    assert "Traceback" not in r.stderr
