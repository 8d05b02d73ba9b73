"""The composed DICOM lookup table (cxr_edge.dicom_lut) against the per-pixel float64 chain it
replaced, and issue 13 kind A: header values the pixel data contradicts (generated DICOMs)."""
from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from cxr_edge.decode import DecodeError, decode  # noqa: E402
from cxr_edge.dicom_lut import stored_to_gray, voi_lut_table  # noqa: E402

F32_ROUNDING = 1e-7   # half an ulp of float32 near 1 is 6e-8


# -- the implementation before the composed table (decode.py at b270880), kept verbatim as reference --
def _ref_first(v) -> float:
    return float(v[0]) if not isinstance(v, (str, bytes)) and hasattr(v, "__len__") else float(v)


def _ref_voi_lut(values, item, ds):
    # the table is parsed by the runtime's own reader; the per-pixel lookup below is the old path
    lut, n, first, out_bits = voi_lut_table(item, ds)
    idx = np.clip(np.rint(values) - first, 0, n - 1).astype(np.intp)
    return (lut[idx] / ((1 << out_bits) - 1)).clip(0, 1)


def _ref_window(values, c, w, function):
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if function == "LINEAR_EXACT":
        return ((values - c) / w + 0.5).clip(0, 1)
    if w == 1:
        return (values >= c - 0.5).astype(np.float64)
    return ((values - (c - 0.5)) / (w - 1) + 0.5).clip(0, 1)


def reference_gray(stored, ds, bits, photometric):
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo_s, hi_s = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = apply_modality_lut(stored, ds).astype(np.float64)
    rng = apply_modality_lut(np.array([lo_s, hi_s], dtype=stored.dtype), ds).astype(np.float64)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None and str(center) != "" and str(width) != "":
        c, w = _ref_first(center), _ref_first(width)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        gray = _ref_window(values, c, w, function)
    elif ds.get("VOILUTSequence"):
        gray = _ref_voi_lut(values, ds.VOILUTSequence[0], ds)
    else:
        lo, hi = float(min(rng)), float(max(rng))
        gray = ((values - lo) / (hi - lo)).clip(0, 1) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    return gray.astype(np.float32)


# -- generated data sets ----------------------------------------------------------------------------
def dataset(stored: np.ndarray, bits: int, photometric="MONOCHROME2", **attrs) -> Dataset:
    """An in-memory DX data set holding `stored` as native little-endian pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 * stored.dtype.itemsize
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    ds.PixelData = np.ascontiguousarray(stored, stored.dtype.newbyteorder("<")).tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def voi_item(entries, first: int, out_bits: int, ow: bool = False) -> Dataset:
    """A VOI LUT item; `ow`: LUT Data as OW bytes (little endian), else as US values."""
    it = Dataset()
    it.LUTDescriptor = [len(entries) % 65536, first, out_bits]
    if ow:
        it.add_new(0x00283006, "OW", np.asarray(entries, "<u2").tobytes())
    else:
        it.add_new(0x00283006, "US", [int(v) for v in entries])
    return it


def modality_item(entries, first: int, out_bits: int) -> Dataset:
    it = Dataset()
    it.LUTDescriptor = [len(entries) % 65536, first, out_bits]
    it.ModalityLUTType = "US"
    it.LUTData = [int(v) for v in entries]
    return it


RNG = np.random.default_rng(13)
U12 = RNG.integers(0, 4096, (37, 41)).astype(np.uint16)
U12[0, :4] = [0, 4095, 2048, 1]
U8 = RNG.integers(0, 256, (19, 23)).astype(np.uint8)
S16 = RNG.integers(-2048, 2048, (29, 31)).astype(np.int16)
S16[0, :2] = [-2048, 2047]


def _ramp_lut(n, out_max, gamma=0.7):
    return np.rint(out_max * (np.arange(n) / (n - 1)) ** gamma).astype(np.int64)


CASES = {
    "u8-plain": lambda: (dataset(U8, 8), U8),
    "u8-mono1": lambda: (dataset(U8, 8, "MONOCHROME1"), U8),
    "u12-rescale-mono1": lambda: (dataset(U12, 12, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1024), U12),
    "u12-rescale-fractional": lambda: (dataset(U12, 12, RescaleSlope=0.37, RescaleIntercept=12.5), U12),
    "u12-window-linear": lambda: (dataset(U12, 12, WindowCenter="1500", WindowWidth="2100"), U12),
    "u12-window-multi-mono1": lambda: (dataset(U12, 12, "MONOCHROME1", RescaleSlope=1, RescaleIntercept=-1024,
                                               WindowCenter=["600", "40"], WindowWidth=["3000", "400"]), U12),
    "u12-window-linear-exact": lambda: (dataset(U12, 12, WindowCenter="2000.5", WindowWidth="1001",
                                                VOILUTFunction="LINEAR_EXACT"), U12),
    "u12-window-sigmoid": lambda: (dataset(U12, 12, WindowCenter="2000", WindowWidth="800",
                                           VOILUTFunction="SIGMOID", RescaleSlope=1.5, RescaleIntercept=-7), U12),
    "u12-window-width1": lambda: (dataset(U12, 12, WindowCenter="2048", WindowWidth="1"), U12),
    "u12-voi-lut": lambda: (dataset(U12, 12, VOILUTSequence=Sequence([voi_item(_ramp_lut(3000, 4095), 500, 12)])),
                            U12),
    "u12-voi-lut-16bit-mono1": lambda: (dataset(U12, 12, "MONOCHROME1", VOILUTSequence=Sequence(
        [voi_item(_ramp_lut(4096, 65535, 1.3), 0, 16)])), U12),
    "u12-modality-lut": lambda: (dataset(U12, 12, ModalityLUTSequence=Sequence(
        [modality_item(_ramp_lut(4096, 8191, 0.9), 0, 16)])), U12),
    "s16-rescale-window": lambda: (dataset(S16, 12, RescaleSlope=1, RescaleIntercept=1000, WindowCenter="900",
                                           WindowWidth="3000"), S16),
    "s16-plain-mono1": lambda: (dataset(S16, 12, "MONOCHROME1"), S16),
    "s16-voi-lut-negative-first": lambda: (dataset(S16, 12, VOILUTSequence=Sequence(
        [voi_item(_ramp_lut(4096, 4095), 65536 - 2048, 12)])), S16),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_composed_table_equals_the_per_pixel_chain(case):
    ds, arr = CASES[case]()
    stored = ds.pixel_array
    assert stored.dtype == arr.dtype and np.array_equal(stored, arr)
    photometric = str(ds.PhotometricInterpretation)
    ref = reference_gray(stored, ds, int(ds.BitsStored), photometric)
    meta = {}
    got = stored_to_gray(stored, ds, int(ds.BitsStored), photometric, "<test>", meta)
    assert got.dtype == np.float32 and got.shape == stored.shape
    assert np.abs(got.astype(np.float64) - ref).max() <= F32_ROUNDING, case
    assert "warnings" not in meta, meta  # consistent headers: nothing to warn about
    # the data are not trivial: the mapping spreads over a good part of 0..1
    assert got.max() - got.min() > 0.3


def test_wide_integers_use_a_table_over_their_span():
    # 32-bit pixels (BitsAllocated 32) fall back to a table over min..max
    a = (U12.astype(np.uint32) * 3 + 70000)
    ds = dataset(a, 20, RescaleSlope=0.5, RescaleIntercept=-3, WindowCenter="40000", WindowWidth="5000")
    ref = reference_gray(a, ds, 20, "MONOCHROME2")
    got = stored_to_gray(a, ds, 20, "MONOCHROME2", "<test>", {})
    assert np.abs(got.astype(np.float64) - ref).max() <= F32_ROUNDING


def test_decode_of_a_file_matches_the_reference(tmp_path):
    ds, arr = CASES["u12-rescale-mono1"]()
    p = tmp_path / "a.dcm"
    ds.save_as(p, enforce_file_format=True)
    d = decode(p)
    ref = reference_gray(arr, ds, 12, "MONOCHROME1")
    assert np.abs(d.pixels.astype(np.float64) - ref).max() <= F32_ROUNDING
    assert "warnings" not in d.meta


@pytest.mark.parametrize("element, value, message", [
    ("WindowWidth", "0.5", r"bad\.dcm: window width 0.5 is invalid for a LINEAR"),
    # the table is checked instead of the image it maps to (decode() skips its full-resolution scan
    # for table outputs): a header mapping stored values to NaN is refused, naming the file
    ("WindowCenter", "nan", r"bad\.dcm: .*NaN or infinity"),
])
def test_invalid_window_is_a_decode_error(tmp_path, element, value, message):
    ds, _ = CASES["u12-window-linear"]()
    setattr(ds, element, value)
    p = tmp_path / "bad.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(DecodeError, match=message):
        decode(p)


# -- issue 13 kind A: trust what the data proves, and say so ----------------------------------------
def test_voi_lut_descriptor_16_bits_with_12_bit_entries(tmp_path):
    entries = _ramp_lut(4096, 4095)
    claimed = dataset(U12, 12, VOILUTSequence=Sequence([voi_item(entries, 0, 16, ow=True)]))
    honest = dataset(U12, 12, VOILUTSequence=Sequence([voi_item(entries, 0, 12)]))
    pc, ph = tmp_path / "claims16.dcm", tmp_path / "honest12.dcm"
    claimed.save_as(pc, enforce_file_format=True)
    honest.save_as(ph, enforce_file_format=True)
    dc, dh = decode(pc), decode(ph)
    # decoded as the 12-bit LUT it is, not 16 x too dark
    assert np.array_equal(dc.pixels, dh.pixels)
    assert dc.pixels.max() > 0.99
    (w,) = dc.meta["warnings"]
    assert str(pc) in w and "16 bits" in w and "4095" in w and "12-bit" in w
    assert "warnings" not in dh.meta


def test_voi_lut_descriptor_8_bits_with_12_bit_entries():
    entries = _ramp_lut(4096, 4095)
    ds = dataset(U12, 12, VOILUTSequence=Sequence([voi_item(entries, 0, 8)]))
    meta = {}
    got = stored_to_gray(ds.pixel_array, ds, 12, "MONOCHROME2", "x.dcm", meta)
    ref = reference_gray(U12, dataset(U12, 12, VOILUTSequence=Sequence([voi_item(entries, 0, 12)])), 12,
                         "MONOCHROME2")
    assert np.abs(got - ref).max() <= F32_ROUNDING
    assert "says 8 bits" in meta["warnings"][0] and "x.dcm" in meta["warnings"][0]


def test_bits_stored_16_with_12_bit_data_and_no_window(tmp_path):
    # e.g. a 12-bit detector's stream in a header that says 16: without a window the scale comes
    # from Bits Stored, and 16 would make the radiograph 16 x too dark
    claimed, honest = dataset(U12, 16, "MONOCHROME1"), dataset(U12, 12, "MONOCHROME1")
    pc, ph = tmp_path / "bits16.dcm", tmp_path / "bits12.dcm"
    claimed.save_as(pc, enforce_file_format=True)
    honest.save_as(ph, enforce_file_format=True)
    dc, dh = decode(pc), decode(ph)
    assert np.array_equal(dc.pixels, dh.pixels)
    (w,) = dc.meta["warnings"]
    assert str(pc) in w and "BitsStored says 16" in w and "4095" in w and "12 bits" in w
    assert dc.meta["bits_proven"] == 12


def test_a_window_rescues_the_scale_so_no_warning():
    ds = dataset(U12, 16, WindowCenter="2048", WindowWidth="4096")
    meta = {}
    got = stored_to_gray(ds.pixel_array, ds, 16, "MONOCHROME2", "w.dcm", meta)
    assert "warnings" not in meta
    assert np.abs(got - reference_gray(U12, ds, 16, "MONOCHROME2")).max() <= F32_ROUNDING


def test_data_beyond_bits_stored_is_scaled_by_its_own_bits():
    # a decoder that hands over values past 2^BitsStored - 1 (a 14-bit stream labelled 12)
    a = (U12.astype(np.uint16) * 4)
    ds = dataset(a, 12)
    meta = {}
    got = stored_to_gray(a, ds, 12, "MONOCHROME2", "deep.dcm", meta)
    assert "BitsStored says 12" in meta["warnings"][0] and "14 bits" in meta["warnings"][0]
    assert np.abs(got - a / 16383.0).max() <= F32_ROUNDING


def test_dark_but_consistent_8_bit_image_is_left_alone():
    a = (U8 // 8).astype(np.uint8)  # max 31: fewer than 8 bits in use, too little to call it a contradiction
    ds = dataset(a, 8)
    meta = {}
    got = stored_to_gray(a, ds, 8, "MONOCHROME2", "dark.dcm", meta)
    assert "warnings" not in meta
    assert np.abs(got - a / 255.0).max() <= F32_ROUNDING


def test_16_bit_png_through_the_table_equals_the_division(tmp_path):
    from PIL import Image
    a = np.random.default_rng(3).integers(0, 65536, (53, 61)).astype(np.uint16)
    a[0, :3] = [0, 65535, 1]
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    d = decode(p)
    assert np.array_equal(d.pixels, (a.astype(np.float32) / np.float32(65535.0)).clip(0, 1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_uncompressed_view_equals_pixel_array(case):
    from cxr_edge.dicom_lut import native_stored
    ds, _ = CASES[case]()
    raw = native_stored(ds)
    assert raw is not None and not raw.flags.writeable  # a view on Pixel Data, no copy
    bits, ph = int(ds.BitsStored), str(ds.PhotometricInterpretation)
    a = stored_to_gray(ds.pixel_array, ds, bits, ph, "x", {})
    b = stored_to_gray(raw, ds, bits, ph, "x", {}, native_raw=True)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("signed", [False, True])
def test_bits_above_bits_stored_are_masked_like_pydicom(signed):
    # junk in the 4 bits above a 12-bit value (retired overlay planes, careless writers)
    from cxr_edge.dicom_lut import native_stored
    base = S16 if signed else U12
    junk = RNG.integers(0, 16, base.shape).astype(np.uint16) << 12
    pattern = (base.view(np.uint16) & 0x0FFF) | junk
    ds = dataset(pattern.view(base.dtype), 12, RescaleSlope=1, RescaleIntercept=-5)
    stored = ds.pixel_array
    assert np.array_equal(stored, base)   # pydicom masks (and sign-extends) to Bits Stored
    raw = native_stored(ds)
    assert raw.max() > 4095
    meta_a, meta_b = {}, {}
    a = stored_to_gray(stored, ds, 12, "MONOCHROME2", "x", meta_a)
    b = stored_to_gray(raw, ds, 12, "MONOCHROME2", "x", meta_b, native_raw=True)
    assert np.array_equal(a, b) and meta_a == meta_b


def test_compressed_or_colour_data_sets_are_not_viewed():
    from cxr_edge.dicom_lut import native_stored
    ds, _ = CASES["u12-window-linear"]()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70"   # JPEG lossless
    assert native_stored(ds) is None
    ds, _ = CASES["u8-plain"]()
    ds.PhotometricInterpretation = "RGB"
    assert native_stored(ds) is None
    ds, _ = CASES["u8-plain"]()
    ds.PixelData = ds.PixelData[:-3]                               # truncated: pydicom's error message
    assert native_stored(ds) is None



def test_table_outputs_are_marked_finite(tmp_path):
    ds, _ = CASES["u12-rescale-mono1"]()
    p = tmp_path / "a.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert decode(p).finite
    assert not decode(np.full((4, 4), 0.5, np.float32)).finite     # a float array is scanned


@pytest.mark.parametrize("threads", [2, 3])
def test_lookup_split_over_threads_gives_the_same_pixels(tmp_path, threads):
    # predict_one splits a large image's table lookup over the cores (bands.run_bands): same values,
    # including a last chunk shorter than the others (701 x 613 = 3.3 chunks of 131,072)
    from PIL import Image

    from cxr_edge.dicom_lut import take_lut
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4096, (701, 613)).astype(np.uint16)
    lut = rng.random(65536, dtype=np.float32)
    assert np.array_equal(take_lut(lut, a, threads=threads), lut[a])
    ds = dataset(4095 - a, 12, "MONOCHROME1", RescaleSlope=1, RescaleIntercept=-1024,
                 WindowCenter="900", WindowWidth="2500")
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    Image.fromarray(a * 16).save(tmp_path / "a.png")
    for name in ("a.dcm", "a.png"):
        one, split = decode(tmp_path / name), decode(tmp_path / name, threads=threads)
        assert split.finite and np.array_equal(split.pixels, one.pixels), name
