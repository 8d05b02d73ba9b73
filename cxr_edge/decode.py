"""Decode: the only module that knows file formats. Everything leaves as float32 grayscale 0..1.

Accepted inputs: a path, bytes, a PIL image, or a numpy array (uint8; uint16 with a stated bit
depth; float in 0..1). Files: JPEG, PNG (8/16-bit, palette, RGBA), TIFF, BMP, and DICOM.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decompression-bomb guard: chest radiographs are at most ~4300 x 4300 (about 18.5 MP); allow
# generous headroom but refuse headers that would allocate gigabytes.
MAX_PIXELS = 60_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

DICOM_MAGIC_OFFSET = 128
_EXIF_ORIENTATION = 0x0112
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "RF", "XA", "MG", "OT", "SC", "PX", "IO"}  # SC/OT: secondary captures


class DecodeError(Exception):
    """An input could not be turned into a grayscale image; the message names the cause."""


@dataclass
class Decoded:
    pixels: np.ndarray                 # float32, H x W, 0..1, 1 = bright (bone), MONOCHROME2 sense
    source: str                        # path, or a description of the in-memory input
    original_size: tuple               # (width, height) as displayed (EXIF orientation applied), before any draft downscale
    meta: dict = field(default_factory=dict)


def _is_dicom(head: bytes) -> bool:
    return len(head) >= DICOM_MAGIC_OFFSET + 4 and head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode(item, min_side: int | None = None, bits_stored: int | None = None) -> Decoded:
    """Decode one input. `min_side` lets JPEG draft mode shrink big files to >= that size."""
    if isinstance(item, Decoded):
        return item
    if isinstance(item, np.ndarray):
        return Decoded(from_array(item, bits_stored), "<array>", (item.shape[1], item.shape[0]) if item.ndim >= 2 else (0, 0))
    if isinstance(item, Image.Image):
        return _from_pil(item, "<PIL image>", min_side=None)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise DecodeError("<bytes>: empty input")
        if _is_dicom(data[:DICOM_MAGIC_OFFSET + 4]):
            return _decode_dicom(io.BytesIO(data), "<bytes>")
        return _decode_pillow(io.BytesIO(data), "<bytes>", min_side)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        name = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise DecodeError(f"{name}: file not found") from None
        except OSError as e:
            raise DecodeError(f"{name}: cannot read ({e.strerror})") from None
        if path.is_dir():
            raise DecodeError(f"{name}: is a directory")
        if size == 0:
            raise DecodeError(f"{name}: empty file (0 bytes)")
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + 4)
        if _is_dicom(head) or path.suffix.lower() in (".dcm", ".dicom"):
            return _decode_dicom(path, name)
        return _decode_pillow(path, name, min_side)
    raise DecodeError(f"unsupported input type {type(item).__name__}")


# -- arrays ------------------------------------------------------------------------------------
def from_array(a: np.ndarray, bits_stored: int | None = None) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3]
        if a.dtype == np.uint8:
            return _rgb8_to_gray(a)
        a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2:
        raise DecodeError(f"<array>: expected H x W (or H x W x 3) pixels, got shape {a.shape}")
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / np.float32(255.0))
    if a.dtype == np.uint16:
        if bits_stored is None:
            raise DecodeError("<array>: uint16 pixels need bits_stored (e.g. 12 for a 12-bit detector)")
        if not 1 <= bits_stored <= 16:
            raise DecodeError(f"<array>: bits_stored must be 1..16, got {bits_stored}")
        return (a.astype(np.float32) / np.float32((1 << bits_stored) - 1)).clip(0, 1)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DecodeError("<array>: float pixels contain NaN or infinity")
        if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
            raise DecodeError(f"<array>: float pixels must lie in 0..1, got {a.min():.3g}..{a.max():.3g}")
        return a.astype(np.float32).clip(0, 1)
    raise DecodeError(f"<array>: unsupported dtype {a.dtype} (use uint8, uint16 with bits_stored, or float 0..1)")


def _rgb8_to_gray(rgb: np.ndarray) -> np.ndarray:
    # Same ITU-R 601-2 luma as Pillow's convert("L"), but kept in float: no second rounding.
    return (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / np.float32(255.0)


# -- Pillow formats --------------------------------------------------------------------------------
def _decode_pillow(fp, name: str, min_side: int | None) -> Decoded:
    # No warnings.catch_warnings() here: it swaps process-wide state and is not thread-safe, and the
    # classifier decodes in a thread pool. Pillow raises DecompressionBombError above 2 x its limit;
    # between 1 x and 2 x it only warns, so the size is checked explicitly below as well.
    try:
        with Image.open(fp) as img:  # closes the file on every path, errors included
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"{name}: {w}x{h} pixels exceeds the decompression-bomb limit of {MAX_PIXELS:,}")
            return _from_pil(img, name, min_side)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,} pixels" if m else "image size"
        raise DecodeError(f"{name}: {size} exceeds the decompression-bomb limit of {MAX_PIXELS:,}") from None
    except UnidentifiedImageError:
        raise DecodeError(f"{name}: not a recognised image file (JPEG, PNG, TIFF, BMP or DICOM)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DecodeError(f"{name}: corrupt or truncated image ({e})") from None


def _from_pil(img: Image.Image, name: str, min_side: int | None) -> Decoded:
    original = img.size
    fmt = img.format
    if fmt == "JPEG" and min_side and img.mode in ("L", "RGB", "CMYK"):
        # DCT-domain downscale by 1/2, 1/4 or 1/8 while both sides stay >= min_side: the cheapest
        # speed-up in the pipeline. Pillow keeps the result >= the requested size.
        img.draft("L" if img.mode != "CMYK" else img.mode, (min_side, min_side))
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1 and fmt in ("TIFF",):
        raise DecodeError(f"{name}: multi-page {fmt} ({n_frames} frames); one radiograph per file expected")
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not cost the image
        orientation = 1
    if orientation in (5, 6, 7, 8):  # transposed: report the size as displayed, like the pixels
        original = (original[1], original[0])
    # Portrait phone photos and rotated scans arrive with EXIF orientation. in_place=False keeps a
    # caller's PIL image untouched.
    img = ImageOps.exif_transpose(img) if orientation != 1 else img
    img.load()
    mode = img.mode
    meta = {"format": fmt, "mode": mode}
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        if a.dtype != np.uint16 and mode != "I":
            a = a.astype(np.uint16)
        # PNG/TIFF 16-bit: full 16-bit scale unless the file says otherwise.
        bits = 16
        meta["bits"] = bits
        gray = (a.astype(np.float32) / np.float32(65535.0)).clip(0, 1)
    elif mode == "F":
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        gray = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    elif mode == "L":
        gray = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    elif mode == "1":
        gray = np.asarray(img.convert("L"), dtype=np.float32) / np.float32(255.0)
    elif mode == "LA":
        gray = np.asarray(img.getchannel("L"), dtype=np.float32) / np.float32(255.0)
    else:
        # palette, RGBA, CMYK, YCbCr ...: via RGB (alpha dropped: radiographs carry no transparency)
        gray = _rgb8_to_gray(np.asarray(img.convert("RGB")))
    return Decoded(np.ascontiguousarray(gray, dtype=np.float32), name, original, meta)


# -- DICOM ------------------------------------------------------------------------------------------
def _first(v) -> float:
    """First value of a possibly multi-valued DICOM number (window centre/width may list several)."""
    try:
        return float(v[0]) if not isinstance(v, (str, bytes)) and hasattr(v, "__len__") else float(v)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"not a number: {v!r}") from None


def _missing_plugin_hint(ts) -> str:
    """Which pixel-data plugins would decode this transfer syntax, according to pydicom itself."""
    install = "pip install 'cxr-edge[dicom]' installs pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg"
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2: no plugin registry to ask
        return f" - a pixel-data handler may be missing: {install}"
    try:
        dec = get_decoder(ts)
    except Exception:  # NotImplementedError: pydicom has no decoder for this syntax at all
        return " - pydicom has no pixel-data decoder for this transfer syntax"
    if dec.is_available:
        return ""
    needs = "; ".join(dec.missing_dependencies)
    return f" - no installed pixel-data plugin decodes it (needs one of: {needs}); {install}"


def _voi_lut(values: np.ndarray, item, ds) -> np.ndarray:
    """VOI LUT (PS3.3 C.11.2.1.1) -> 0..1. pydicom's apply_voi indexes through an array of the LUT's
    own entry type (8-bit LUTs wrap indices >= 256), so the lookup is done here."""
    desc = [int(v) for v in item.LUTDescriptor]
    n = desc[0] or 65536
    first = desc[1]
    if first >= 32768 and int(ds.get("PixelRepresentation", 0)) == 1:
        first -= 65536   # first mapped value is signed (SS) for signed pixel data
    out_bits = desc[2]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        little = getattr(ds, "is_little_endian", None)
        if little is None:
            little = True
        lut = np.frombuffer(data, dtype="<u2" if little else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(data, dtype=np.float64))
    if lut.size < n:
        raise ValueError(f"VOI LUT has {lut.size} entries, its descriptor says {n}")
    idx = np.clip(np.rint(values) - first, 0, n - 1).astype(np.intp)
    return (lut[:n].astype(np.float64)[idx] / ((1 << out_bits) - 1)).clip(0, 1)


def _window(values: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """VOI window (PS3.3 C.11.2.1.2/3) -> 0..1."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflow far below the window is 0, as it should be
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if function == "LINEAR_EXACT":
        return ((values - c) / w + 0.5).clip(0, 1)
    if w == 1:  # LINEAR with width 1 is a threshold (the formula's w - 1 would divide by zero)
        return (values >= c - 0.5).astype(np.float64)
    return ((values - (c - 0.5)) / (w - 1) + 0.5).clip(0, 1)


def _decode_dicom(fp, name: str) -> Decoded:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        try:
            import pydicom
            from pydicom.pixel_data_handlers.util import apply_modality_lut
        except ImportError:
            raise DecodeError(f"{name}: DICOM support needs pydicom: pip install 'cxr-edge[dicom]'") from None
    try:
        ds = pydicom.dcmread(fp)
    except Exception as e:  # pydicom raises many types for malformed files
        raise DecodeError(f"{name}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    modality = str(ds.get("Modality", "")).upper()
    if modality and modality not in RADIOGRAPH_MODALITIES:
        raise DecodeError(f"{name}: modality {modality} is not a radiograph (expected CR/DX and similar)")
    if "PixelData" not in ds:
        raise DecodeError(f"{name}: DICOM file has no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"{name}: malformed image header ({e})") from None
    if frames > 1:
        raise DecodeError(f"{name}: multi-frame DICOM ({frames} frames); one radiograph per file expected")
    if rows * cols > MAX_PIXELS:
        # Checked before any pixel buffer is allocated: a compressed stream can claim any size.
        raise DecodeError(f"{name}: {cols}x{rows} pixels exceeds the decompression-bomb limit of {MAX_PIXELS:,}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(ts, "name", str(ts))
    try:
        stored = ds.pixel_array
    except Exception as e:
        msg = str(e).strip()
        first_line = msg.splitlines()[0].rstrip(": ") if msg else type(e).__name__
        raise DecodeError(f"{name}: cannot decode pixel data with transfer syntax {ts_name}: {first_line}"
                          f"{_missing_plugin_hint(ts) if ts is not None else ''}") from None
    try:
        bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
    except (TypeError, ValueError):
        bits = 8 * stored.dtype.itemsize
    if not 1 <= bits <= 32:
        raise DecodeError(f"{name}: BitsStored {bits} is invalid")
    meta = {"format": "DICOM", "modality": modality, "photometric": photometric, "bits_stored": bits,
            "transfer_syntax": str(ts) if ts else None}
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        # Secondary captures sometimes store colour; treat as a picture of a radiograph.
        if stored.ndim == 3 and stored.shape[-1] == 3:
            # pydicom >= 3 returns YBR data already converted to RGB (its pixel_array default);
            # pydicom 2 returns it as stored.
            if photometric.startswith("YBR") and int(pydicom.__version__.split(".")[0]) < 3:
                from pydicom.pixel_data_handlers.util import convert_color_space
                stored = convert_color_space(stored, photometric, "RGB")
            rgb = stored.astype(np.float64) / ((1 << bits) - 1)
            gray = (rgb @ np.array([0.299, 0.587, 0.114])).clip(0, 1).astype(np.float32)
            return Decoded(np.ascontiguousarray(gray), name, (gray.shape[1], gray.shape[0]), meta)
        raise DecodeError(f"{name}: photometric interpretation {photometric} unsupported")
    if stored.ndim != 2:
        raise DecodeError(f"{name}: expected a single 2-D image, got pixel array of shape {stored.shape}")
    try:
        # Range of the stored values, carried through the same LUTs as the pixels, gives the scale.
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        lo_s, hi_s = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        values = apply_modality_lut(stored, ds).astype(np.float64)
        rng = apply_modality_lut(np.array([lo_s, hi_s], dtype=stored.dtype), ds).astype(np.float64)
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None and str(center) != "" and str(width) != "":
            c, w = _first(center), _first(width)
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            if (function == "LINEAR" and w < 1) or not w > 0:
                raise DecodeError(f"{name}: window width {w} is invalid for a {function} VOI function")
            gray = _window(values, c, w, function)
            meta["window"] = (c, w)
            if function != "LINEAR":
                meta["voi_function"] = function
        elif ds.get("VOILUTSequence"):
            gray = _voi_lut(values, ds.VOILUTSequence[0], ds)
            meta["voi_lut"] = True
        else:
            lo, hi = float(min(rng)), float(max(rng))
            gray = ((values - lo) / (hi - lo)).clip(0, 1) if hi > lo else np.zeros_like(values)
    except DecodeError:
        raise
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DecodeError(f"{name}: malformed grayscale transform in the DICOM header ({type(e).__name__}: {e})") from None
    if photometric == "MONOCHROME1":
        gray = 1.0 - gray
    gray = gray.astype(np.float32)
    return Decoded(np.ascontiguousarray(gray), name, (gray.shape[1], gray.shape[0]), meta)
