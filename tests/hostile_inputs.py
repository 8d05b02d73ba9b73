"""Small GENERATED inputs for decode hardening tests and the fuzz target (no real images).

Encoders for what Pillow cannot write: a 12-bit extended (SOF1) JPEG with DC-only blocks and a
lossless (SOF3, predictor 1) JPEG of any precision 2..16 bits, both exact by construction, plus
DICOM builders (with or without preamble / file meta, encapsulated streams) and byte patchers."""
from __future__ import annotations

import io
import struct

import numpy as np


# -- JPEG encoders ---------------------------------------------------------------------------------
class _Bits:
    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, value: int, length: int):
        for i in range(length - 1, -1, -1):
            self.acc = (self.acc << 1) | ((value >> i) & 1)
            self.n += 1
            if self.n == 8:
                self.out.append(self.acc)
                if self.acc == 0xFF:
                    self.out.append(0)          # byte stuffing
                self.acc, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)   # pad with 1-bits
        return bytes(self.out)


def _canonical(bits: list[int], values: list[int]) -> dict:
    codes, code, k = {}, 0, 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            codes[values[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


def _seg(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _category(d: int) -> tuple[int, int]:
    """JPEG magnitude category and its extra bits for difference d."""
    if d == 0:
        return 0, 0
    s = int(abs(d)).bit_length()
    return s, (d if d > 0 else d + (1 << s) - 1)


def jpeg_lossless(a: np.ndarray, precision: int) -> bytes:
    """H x W unsigned array -> lossless JPEG (T.81 process 14, SOF3, predictor 1, Pt 0), exact."""
    h, w = a.shape
    x = a.astype(np.int64)
    nsym = 17
    bits = [0] * 16
    bits[4] = nsym                                    # 17 codes of length 5 (never all ones)
    table = _canonical(bits, list(range(nsym)))
    bw = _Bits()
    for i in range(h):
        for j in range(w):
            if i == 0 and j == 0:
                pred = 1 << (precision - 1)
            elif i == 0:
                pred = x[i, j - 1]
            elif j == 0:
                pred = x[i - 1, j]
            else:
                pred = x[i, j - 1]
            d = int(x[i, j] - pred) % 65536
            if d >= 32768:
                d -= 65536
            if d == -32768:
                bw.put(*table[16])                    # category 16: no extra bits
                continue
            s, extra = _category(d)
            bw.put(*table[s])
            if s:
                bw.put(extra, s)
    out = b"\xff\xd8"
    out += _seg(0xC3, struct.pack(">BHHB", precision, h, w, 1) + bytes([1, 0x11, 0]))
    out += _seg(0xC4, bytes([0x00]) + bytes(bits) + bytes(range(nsym)))
    out += _seg(0xDA, bytes([1, 1, 0x00, 1, 0, 0]))
    return out + bw.flush() + b"\xff\xd9"


def jpeg12_dc_only(blocks: np.ndarray) -> bytes:
    """(H/8) x (W/8) array of 12-bit values -> 12-bit extended JPEG (SOF1) whose every 8x8 block is
    flat at that value (DC only, quantiser 1): decodes exactly to np.kron(blocks, ones(8, 8))."""
    bh, bw_ = blocks.shape
    dc_bits = [0] * 16
    dc_bits[4] = 16                                   # categories 0..15 at length 5
    dc = _canonical(dc_bits, list(range(16)))
    ac_bits = [0] * 16
    ac_bits[0] = 1                                    # EOB only, code "0"
    ac = _canonical(ac_bits, [0x00])
    bw = _Bits()
    prev = 0
    for i in range(bh):
        for j in range(bw_):
            coef = 8 * (int(blocks[i, j]) - 2048)
            s, extra = _category(coef - prev)
            bw.put(*dc[s])
            if s:
                bw.put(extra, s)
            bw.put(*ac[0])
            prev = coef
    out = b"\xff\xd8"
    out += _seg(0xDB, bytes([0x00]) + bytes([1] * 64))
    out += _seg(0xC1, struct.pack(">BHHB", 12, bh * 8, bw_ * 8, 1) + bytes([1, 0x11, 0]))
    out += _seg(0xC4, bytes([0x00]) + bytes(dc_bits) + bytes(range(16)))
    out += _seg(0xC4, bytes([0x10]) + bytes(ac_bits) + bytes([0x00]))
    out += _seg(0xDA, bytes([1, 1, 0x00, 0, 63, 0]))
    return out + bw.flush() + b"\xff\xd9"


def pillow_jpeg(a: np.ndarray, mode: str = "L", quality: int = 90) -> bytes:
    from PIL import Image
    b = io.BytesIO()
    Image.fromarray(a).convert(mode).save(b, "JPEG", quality=quality)
    return b.getvalue()


def patch_sof(stream: bytes, height: int | None = None, width: int | None = None, marker: bytes = b"") -> bytes:
    """A JPEG/JPEG-LS stream with its frame header's height/width replaced."""
    s = bytearray(stream)
    i = next(k for k in range(2, len(s) - 1) if s[k] == 0xFF and (s[k + 1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7)
                                                               if not marker else bytes(s[k:k + 2]) == marker))
    if height is not None:
        s[i + 5:i + 7] = struct.pack(">H", height)
    if width is not None:
        s[i + 7:i + 9] = struct.pack(">H", width)
    return bytes(s)


def patch_siz(stream: bytes, width: int, height: int) -> bytes:
    """A JPEG 2000 codestream with SIZ Xsiz/Ysiz replaced (offsets kept)."""
    s = bytearray(stream)
    i = s.find(b"\xff\x51")
    s[i + 6:i + 14] = struct.pack(">II", width, height)
    return bytes(s)


# -- DICOM --------------------------------------------------------------------------------------------
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"


def dicom_dataset(arr: np.ndarray | None = None, photometric: str = "MONOCHROME2", bits_stored: int = 8,
                  modality: str = "DX", **attrs):
    """A DX data set with file meta; native pixel data from `arr` when given."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_SOP
    ds.SOPClassUID = DX_SOP
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "cxr-edge-test"
    if arr is not None:
        ds.set_pixel_data(arr, photometric, bits_stored)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def encapsulated_dicom(stream: bytes, rows: int, cols: int, ts: str, samples: int = 1, bits: int = 8,
                       photometric: str = "MONOCHROME2", bits_allocated: int | None = None):
    """A data set whose Pixel Data is `stream` encapsulated as one fragment, header as given."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID
    ds = dicom_dataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated or (8 if bits <= 8 else 16)
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def dicom_bytes(ds, preamble: bool = True, implicit: bool = False, little: bool = True) -> bytes:
    """Serialise: with preamble + "DICM" + file meta (preamble=True), or the bare data set only."""
    import pydicom
    b = io.BytesIO()
    if preamble:
        ds.save_as(b, enforce_file_format=True)
    else:
        import copy
        bare = copy.deepcopy(ds)
        if hasattr(bare, "file_meta"):
            del bare.file_meta
        if not little and "PixelData" in bare and int(bare.get("BitsAllocated", 8)) == 16:
            # pydicom writes the pixel bytes as they are: swap them for a big-endian data set
            bare.PixelData = np.frombuffer(bare.PixelData, "<u2").astype(">u2").tobytes()
        pydicom.dcmwrite(b, bare, implicit_vr=implicit, little_endian=little)
    return b.getvalue()


# -- fuzz seeds and mutators (tests/fuzz_decode.py, tests/test_fuzz_decode.py) ------------------------
def seeds() -> dict[str, bytes]:
    """Small valid inputs of every accepted format, generated (deterministic)."""
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless
    rng = np.random.default_rng(1)
    g8 = rng.integers(0, 256, (16, 24)).astype(np.uint8)
    g12 = rng.integers(0, 4096, (16, 24)).astype(np.uint16)
    out = {}

    def pil(arr, fmt, **kw):
        b = io.BytesIO()
        Image.fromarray(arr).save(b, fmt, **kw)
        return b.getvalue()

    out["png8"] = pil(g8, "PNG")
    out["png16"] = pil(g12 * 16, "PNG")
    out["png_optimized"] = pil(g8, "PNG", optimize=True)
    out["png_rgba"] = pil(np.dstack([g8, g8, g8, g8]), "PNG")
    out["jpeg"] = pil(g8, "JPEG", quality=90)
    out["jpeg_rgb"] = pil(np.dstack([g8, 255 - g8, g8]), "JPEG")
    out["jpeg_progressive"] = pil(g8, "JPEG", progressive=True)
    out["jpeg12"] = jpeg12_dc_only(rng.integers(0, 4096, (2, 3)))
    out["jpeg_lossless16"] = jpeg_lossless(g12 * 16, 16)
    out["tiff"] = pil(g8, "TIFF")
    out["tiff_float"] = pil((g8 / 255.0).astype(np.float32), "TIFF")
    out["tiff_lzw"] = pil(g8, "TIFF", compression="tiff_lzw")
    out["bmp"] = pil(g8, "BMP")
    out["dcm8"] = dicom_bytes(dicom_dataset(g8))
    out["dcm12_window"] = dicom_bytes(dicom_dataset(g12, "MONOCHROME1", 12, WindowCenter=2048, WindowWidth=4096,
                                                    RescaleSlope=2, RescaleIntercept=-1024))
    out["dcm_raw_implicit"] = dicom_bytes(dicom_dataset(g12, bits_stored=12), preamble=False, implicit=True)
    out["dcm_raw_big"] = dicom_bytes(dicom_dataset(g12, bits_stored=12), preamble=False, little=False)
    ds = dicom_dataset(g12, bits_stored=12)
    ds.compress(RLELossless)
    out["dcm_rle"] = dicom_bytes(ds)
    out["dcm_jpeg"] = dicom_bytes(encapsulated_dicom(pillow_jpeg(g8), 16, 24, JPEGBaseline8Bit))
    out["dcm_lossless"] = dicom_bytes(encapsulated_dicom(jpeg_lossless(g12, 12), 16, 24, JPEGLosslessSV1, bits=12))
    for name, ts, arr in (("dcm_j2k", JPEG2000Lossless, np.tile(g12, (4, 3))[:64, :64].copy()),
                          ("dcm_jpegls", JPEGLSLossless, g8)):
        try:
            ds = dicom_dataset(arr, bits_stored=12 if arr.dtype == np.uint16 else 8)
            ds.compress(ts)
            out[name] = dicom_bytes(ds)
        except Exception:   # encoder plugin not installed
            pass
    return out


_INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


def mutate(data: bytes, rng) -> bytes:
    """One to four random byte-level mutations (flip, set, interesting integer, insert, delete,
    duplicate a slice, truncate)."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        if not b:
            b = bytearray(b"\0")
        op = int(rng.integers(0, 8))
        i = int(rng.integers(0, len(b)))
        if op == 0:
            b[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            b[i] = int(rng.integers(0, 256))
        elif op == 2:
            v = _INTERESTING[int(rng.integers(0, len(_INTERESTING)))]
            width = int(rng.choice([1, 2, 4]))
            order = "<" if rng.integers(0, 2) else ">"
            fmt = {1: "B", 2: "H", 4: "I"}[width]
            b[i:i + width] = struct.pack(order + fmt, v & ((1 << (8 * width)) - 1))
        elif op == 3:
            b[i:i] = bytes(rng.integers(0, 256, int(rng.integers(1, 16))).astype(np.uint8))
        elif op == 4:
            del b[i:i + int(rng.integers(1, 64))]
        elif op == 5:
            j = int(rng.integers(0, len(b)))
            b[i:i] = b[j:j + int(rng.integers(1, 256))]
        elif op == 6:
            del b[max(1, i):]
        else:
            b[i:i + 2] = b"\xff" + bytes([int(rng.integers(0xC0, 0x100))])   # JPEG-ish marker
    return bytes(b)


_HEADER_VALUES = {
    "Rows": [0, 1, 16, 17, 65535], "Columns": [0, 1, 24, 23, 65535], "BitsAllocated": [1, 8, 12, 16, 32, 64],
    "BitsStored": [0, 1, 8, 12, 16, 17, 32], "HighBit": [0, 7, 11, 15, 31], "PixelRepresentation": [0, 1, 2],
    "SamplesPerPixel": [0, 1, 3, 4], "NumberOfFrames": [0, 1, 2, 1000000],
    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "", "monochrome2"],
    "RescaleSlope": [0, -1, 1e308, 1e-300, 2], "RescaleIntercept": [-1e308, 0, 1024],
    "WindowCenter": [0, -1e9, 1e308, 2048], "WindowWidth": [0, 1, -5, 1e-9, 4096, 1e308],
    "VOILUTFunction": ["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"],
    "Modality": ["DX", "CT", "", "OT"], "PlanarConfiguration": [0, 1, 2],
}
_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
             "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
             "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99", "1.2.3.4"]


def mutate_dicom_header(data: bytes, rng) -> bytes:
    """A DICOM seed with 1..4 header attributes (size, bit depths, photometric, LUTs, transfer
    syntax) set to boundary or contradictory values, re-serialised; the pixel data unchanged."""
    import warnings as _w

    import pydicom
    from pydicom.uid import UID
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        for _ in range(int(rng.integers(1, 5))):
            if rng.integers(0, 6) == 0 and hasattr(ds, "file_meta"):
                ds.file_meta.TransferSyntaxUID = UID(_SYNTAXES[int(rng.integers(0, len(_SYNTAXES)))])
                continue
            key = list(_HEADER_VALUES)[int(rng.integers(0, len(_HEADER_VALUES)))]
            vals = _HEADER_VALUES[key]
            try:
                setattr(ds, key, vals[int(rng.integers(0, len(vals)))])
            except Exception:
                pass
        b = io.BytesIO()
        try:
            ds.save_as(b, enforce_file_format=False)
        except Exception:
            return data
    return b.getvalue()
