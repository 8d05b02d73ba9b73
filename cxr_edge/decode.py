"""Decode: the only module that knows file formats. Everything leaves as float32 grayscale 0..1.

Accepted inputs: a path, bytes, a PIL image, or a numpy array (uint8; uint16 with a stated bit
depth; float in 0..1). Files: JPEG, PNG (8/16-bit, palette, RGBA), TIFF, BMP, and DICOM.
"""
from __future__ import annotations

import io
import logging
import os
import re
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .inputs import Pixels, describe

# Decompression-bomb guard: chest radiographs are at most ~4300 x 4300 (about 18.5 MP); allow
# generous headroom but refuse headers that would allocate gigabytes.
MAX_PIXELS = 60_000_000   # checked here against every header; Pillow's own process-wide limit is left alone

DICOM_MAGIC_OFFSET = 128
_EXIF_ORIENTATION = 0x0112
RADIOGRAPH_MODALITIES = {"CR", "DX", "DR", "RG", "RF", "XA", "MG", "OT", "SC", "PX", "IO"}  # SC/OT: secondary captures


class DecodeError(Exception):
    """An input could not be turned into a grayscale image; the message names the cause."""


@dataclass
class Decoded:
    """One decoded input, as `decode` returns it.

    Attributes:
        pixels: (H, W) float32 0..1, 1 = bright (bone): the DICOM MONOCHROME2 sense (PS3.3 C.7.6.3.1.2).
        source: the path, or a description of the in-memory input.
        original_size: (width, height) as displayed (EXIF orientation applied), before any draft downscale.
        meta: what the decoder found, e.g. "format", "mode", "bits", and "warnings" (list of str).
        finite: True when the decoder proved every pixel finite (a lookup through a table checked
            to be finite); decode() then skips its per-pixel NaN/infinity scan.
    """
    pixels: np.ndarray                 # float32, H x W, 0..1, 1 = bright (bone), MONOCHROME2 sense
    source: str                        # path, or a description of the in-memory input
    original_size: tuple               # (width, height) as displayed (EXIF orientation applied), before any draft downscale
    meta: dict = field(default_factory=dict)
    finite: bool = field(default=False, repr=False, compare=False)


def _is_dicom(head: bytes) -> bool:
    return len(head) >= DICOM_MAGIC_OFFSET + 4 and head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"


# Groups a DICOM data set written without preamble and file meta (DICOMDIR exports name such files
# IM000001 and the like) starts with: file meta itself, or the first identifying/patient/image groups.
_RAW_FIRST_GROUPS = {0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028}
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
        b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
        b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


def _raw_dicom_encoding(head: bytes) -> str | None:
    """For a data set without the 128-byte preamble and "DICM": how its first element is encoded
    ("implicit little", "explicit little", "explicit big"), or None when the bytes do not start like
    a DICOM data element. Used to sniff such files whatever their name, and bytes inputs."""
    if len(head) < 8:
        return None
    for order, label in (("<", "little"), (">", "big")):
        group, elem = struct.unpack(order + "HH", head[:4])
        if group not in _RAW_FIRST_GROUPS or elem > 0x1FFF:
            continue
        if head[4:6] in _VRS:
            return f"explicit {label}"
        if order == "<":
            length = struct.unpack("<I", head[4:8])[0]
            if length < 0x10000 and elem != 0 or (elem == 0 and length == 4):
                return "implicit little"
    return None


def decode(item, min_side: int | None = None, bits_stored: int | None = None, threads: int = 1) -> Decoded:
    """Decode one input (path, bytes, PIL image, numpy array) -> Decoded (float32 H x W, 0..1).

    `min_side` lets JPEG draft mode shrink big files to >= that size; `bits_stored` scales uint16
    arrays; `threads` > 1 splits a 16-bit file's lookup table pass over that many threads (one large
    image, e.g. `Classifier.predict_one`; same values). Raises DecodeError (message: the input's
    name, then the cause) for every bad input,
    whatever the decoder library raised; never returns NaN or infinity. Library warnings raised
    while decoding (Pillow, pydicom, the JPEG plugins, numpy) and header contradictions found here
    are not printed: they are returned in `meta["warnings"]` (list of str, each naming the input).
    """
    if isinstance(item, Decoded):
        return item
    name = describe(item)
    # numpy's floating-point warnings are raised from C, past warnings.warn: route them the same way
    # (np.errstate is per thread/context, so this does not touch other threads)
    with _collect_warnings() as caught, np.errstate(all="call", call=_numpy_warning):
        try:
            d = _decode_any(item, min_side, bits_stored, threads)
            if not d.finite:
                _check_finite(d.pixels, name)
        except DecodeError:
            raise
        except MemoryError:
            raise DecodeError(f"{name}: out of memory while decoding") from None
        except RecursionError:
            raise DecodeError(f"{name}: malformed file (nesting too deep to decode)") from None
        except Exception as e:  # any decoder library, any bad file: one error naming input and cause
            raise DecodeError(f"{name}: cannot decode ({type(e).__name__}: {_first_line(e)})") from None
    if caught:
        w = d.meta.setdefault("warnings", [])
        w.extend(f"{name}: {m}" for m in caught if f"{name}: {m}" not in w)
    return d


# Decode + preprocess working set per pixel. Measured peak over the resting process: 8.0 B/px (8-bit PNG,
# 60 MP), 7.9 (16-bit PNG), 9.1 (12-bit DICOM with rescale); 16 leaves room for plugin buffers.
BYTES_PER_PIXEL = 16


def estimate_bytes(item) -> int:
    """Working memory decode() + preprocess will need for `item`, in bytes, from its header only
    (Pillow's lazy open, or the DICOM header without pixel data): pixels x BYTES_PER_PIXEL, capped
    at the pixel limit. Unreadable headers estimate small (decode refuses them quickly). Never raises."""
    with _collect_warnings():
        try:
            return min(_estimate_pixels(item), MAX_PIXELS) * BYTES_PER_PIXEL
        except Exception:
            return 1 << 20


def _estimate_pixels(item) -> int:
    if isinstance(item, np.ndarray):
        return max(1, item.size)
    if isinstance(item, Image.Image):
        return item.size[0] * item.size[1]
    if isinstance(item, Decoded):
        return 0
    if hasattr(item, "array") and hasattr(item, "bits_stored"):     # cxr_edge.Pixels
        return max(1, np.asarray(item.array).size)
    if isinstance(item, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(item))
        head = bytes(item[:DICOM_MAGIC_OFFSET + 4])
    else:
        src = Path(item)
        head = _read_head(src, DICOM_MAGIC_OFFSET + 4)
    if _is_dicom(head) or _raw_dicom_encoding(head[:16]) or (not isinstance(src, io.BytesIO)
                                                            and src.suffix.lower() in (".dcm", ".dicom")):
        import pydicom
        ds = pydicom.dcmread(src, stop_before_pixels=True, force=True,
                             specific_tags=["Rows", "Columns", "SamplesPerPixel", "NumberOfFrames"])
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1)
    with Image.open(src) as im:
        return im.size[0] * im.size[1]


def _first_line(e: BaseException) -> str:
    msg = str(e).strip()
    return msg.splitlines()[0].rstrip(": ")[:300] if msg else type(e).__name__


def _check_finite(pixels: np.ndarray, name: str) -> None:
    """The one NaN/infinity rule, for every path: refuse (no pixel value can be trusted once a
    decoder produced a non-finite one, and a NaN would silently turn into a label)."""
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        bad = int(pixels.size - np.isfinite(pixels).sum())
        raise DecodeError(f"{name}: pixels contain NaN or infinity ({bad:,} of {pixels.size:,} values)")


# -- warnings: collected per decoding thread, returned with the result -------------------------------
# warnings.catch_warnings() swaps process-wide state and is not thread-safe (the classifier decodes in
# a thread pool), and the default filters show a warning only once per code location, so the second
# file with the same problem would say nothing. Instead `warnings.warn` is wrapped once: while the
# calling thread is inside decode(), a warning goes to that thread's list (never to stderr); in every
# other thread, or outside decode(), the original function runs unchanged. pydicom also logs its
# warnings on the "pydicom" logger; a handler collects those the same way (and de-duplicates).
_tls = threading.local()
_NOT_COLLECTED = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning, FutureWarning)
_install_lock = threading.Lock()
_original_warn = None


def _patched_warn(message, category=None, stacklevel=1, source=None, **kw):
    sink = getattr(_tls, "sink", None)
    if isinstance(message, Warning):
        category = type(message)
    if sink is None or (isinstance(category, type) and (issubclass(category, _NOT_COLLECTED)
                                                        or category.__name__ == "DependencyWarning")):
        # not decoding, or an import-time / deprecation notice of some library: the normal filters apply
        return _original_warn(message, category, stacklevel + 1, source, **kw)
    text = str(message.args[0] if isinstance(message, Warning) and message.args else message)
    cat = category.__name__ if isinstance(category, type) else type(message).__name__ if isinstance(message, Warning) else "UserWarning"
    _add_warning(sink, text if cat == "UserWarning" else f"{cat}: {text}")


def _numpy_warning(kind: str, flag: int) -> None:
    sink = getattr(_tls, "sink", None)
    if sink is not None:
        _add_warning(sink, f"RuntimeWarning: {kind} in a numpy operation (the result is checked for NaN/infinity)")


def _add_warning(sink: list, text: str) -> None:
    text = " ".join(text.split())[:500]
    if text and text not in sink and not any(text in s or s in text for s in sink):
        sink.append(text)


class _LogToSink(logging.Handler):
    def emit(self, record):
        sink = getattr(_tls, "sink", None)
        if sink is not None and record.levelno >= logging.WARNING:
            try:
                _add_warning(sink, record.getMessage())
            except Exception:
                pass


def _install_warning_hooks():
    global _original_warn
    with _install_lock:
        if _original_warn is None:
            _original_warn = warnings.warn
            warnings.warn = _patched_warn
            logging.getLogger("pydicom").addHandler(_LogToSink())


class _collect_warnings:
    """Context manager: warnings raised in this thread while inside go to the returned list."""
    def __enter__(self) -> list:
        _install_warning_hooks()
        self.outer = getattr(_tls, "sink", None)
        _tls.sink = self.outer if self.outer is not None else []   # nested decode(): the outer list
        return _tls.sink

    def __exit__(self, *exc):
        if self.outer is None:
            _tls.sink = None
        return False


def _decode_any(item, min_side: int | None, bits_stored: int | None, threads: int = 1) -> Decoded:
    if isinstance(item, Decoded):
        return item
    if isinstance(item, Pixels):
        px = from_array(np.asarray(item.array), item.bits_stored, item.name)
        return Decoded(1.0 - px if item.monochrome1 else px, item.name, (px.shape[1], px.shape[0]))
    if isinstance(item, np.ndarray):
        return Decoded(from_array(item, bits_stored), "<array>", (item.shape[1], item.shape[0]) if item.ndim >= 2 else (0, 0))
    if isinstance(item, Image.Image):
        return _from_pil(item, "<PIL image>", min_side=None)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        if not data:
            raise DecodeError("<bytes>: empty input")
        if _is_dicom(data[:DICOM_MAGIC_OFFSET + 4]) or _raw_dicom_encoding(data[:16]):
            return _decode_dicom(io.BytesIO(data), "<bytes>", threads)
        return _decode_pillow(io.BytesIO(data), "<bytes>", min_side, threads)
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
        if _is_dicom(head) or _raw_dicom_encoding(head[:16]) or path.suffix.lower() in (".dcm", ".dicom"):
            return _decode_dicom(path, name, threads)
        return _decode_pillow(path, name, min_side, threads)
    raise DecodeError(f"unsupported input type {type(item).__name__}")


# -- arrays ------------------------------------------------------------------------------------
def from_array(a: np.ndarray, bits_stored: int | None = None, name: str = "<array>") -> np.ndarray:
    """numpy pixels -> float32 H x W 0..1. uint8 (/255); uint16 with `bits_stored` (/(2^bits - 1));
    float in 0..1 (NaN/infinity refused, like every other path); H x W x 3/4 via ITU-R 601 luma.
    Either byte order is accepted (a big-endian '>u2' array is byte-swapped to native first).
    Raises DecodeError naming the shape/dtype problem."""
    if a.dtype.byteorder not in ("=", "|") and a.dtype.byteorder != np.dtype(a.dtype.type).byteorder:
        a = a.astype(a.dtype.newbyteorder("="))       # '>u2' from a big-endian file or network buffer
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = a[..., :3]
        if a.dtype == np.uint8:
            return _rgb8_to_gray(a)
        a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2:
        raise DecodeError(f"{name}: expected H x W (or H x W x 3) pixels, got shape {a.shape}")
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / np.float32(255.0))
    if a.dtype == np.uint16:
        if bits_stored is None:
            raise DecodeError(f"{name}: uint16 pixels need their bit depth: pass cxr_edge.Pixels(array, bits_stored=12) "
                              "(12 for a 12-bit detector)")
        if not 1 <= bits_stored <= 16:
            raise DecodeError(f"{name}: bits_stored must be 1..16, got {bits_stored}")
        return (a.astype(np.float32) / np.float32((1 << bits_stored) - 1)).clip(0, 1)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DecodeError(f"{name}: float pixels contain NaN or infinity")
        if a.size and (a.min() < -1e-6 or a.max() > 1 + 1e-6):
            raise DecodeError(f"{name}: float pixels must lie in 0..1, got {a.min():.3g}..{a.max():.3g}")
        return a.astype(np.float32).clip(0, 1)
    raise DecodeError(f"{name}: unsupported dtype {a.dtype} (use uint8, uint16 with bits_stored, or float 0..1)")


def _rgb8_to_gray(rgb: np.ndarray) -> np.ndarray:
    # Same ITU-R 601-2 luma as Pillow's convert("L"), but kept in float: no second rounding.
    return (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / np.float32(255.0)


# -- Pillow formats --------------------------------------------------------------------------------
def _decode_pillow(fp, name: str, min_side: int | None, threads: int = 1) -> Decoded:
    # No warnings.catch_warnings() here: it swaps process-wide state and is not thread-safe, and the
    # classifier decodes in a thread pool. Pillow raises DecompressionBombError above 2 x its limit;
    # between 1 x and 2 x it only warns, so the size is checked explicitly below as well.
    try:
        with Image.open(fp) as img:  # closes the file on every path, errors included
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(f"{name}: {w}x{h} pixels exceeds the decompression-bomb limit of {MAX_PIXELS:,}")
            return _from_pil(img, name, min_side, threads)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)):,} pixels" if m else "image size"
        raise DecodeError(f"{name}: {size} exceeds the decompression-bomb limit of {MAX_PIXELS:,}") from None
    except (UnidentifiedImageError, OSError) as e:
        head = fp.getvalue()[:2] if isinstance(fp, io.BytesIO) else _read_head(fp, 2)
        if head == b"\xff\xd8" and _pillow_cannot(fp, name):
            # 12-bit lossy, lossless (SOF3) and JPEG-LS files: Pillow's libjpeg has 8-bit baseline/progressive only
            return _decode_jpeg_plugin(fp.getvalue() if isinstance(fp, io.BytesIO) else Path(fp).read_bytes(), name, e)
        if isinstance(e, UnidentifiedImageError):
            raise DecodeError(f"{name}: not a recognised image file (JPEG, PNG, TIFF, BMP or DICOM)") from None
        raise DecodeError(f"{name}: corrupt or truncated image ({_first_line(e)})") from None
    except (SyntaxError, ValueError, EOFError, TypeError, NotImplementedError, IndexError, KeyError, struct.error,
            ZeroDivisionError) as e:   # Pillow plugins raise these on malformed headers (e.g. PNG interlace method 2)
        raise DecodeError(f"{name}: corrupt or truncated image ({type(e).__name__}: {_first_line(e)})") from None


def _pillow_cannot(fp, name: str) -> bool:
    """True for a JPEG whose frame header is one Pillow does not decode (not 8-bit, or lossless / JPEG-LS):
    those go to the pylibjpeg plugins; a broken 8-bit baseline file keeps Pillow's own message."""
    from . import streams
    data = fp.getvalue()[:1 << 20] if isinstance(fp, io.BytesIO) else _read_head(fp, 1 << 20)
    try:
        info = streams.jpeg_info(data)
    except streams.StreamError as e:   # e.g. height 0: say so, not "not a recognised image file"
        raise DecodeError(f"{name}: corrupt or truncated image (JPEG: {e})") from None
    return info.kind == "jpeg-ls" or info.precision != 8 or "lossless" in info.process or "differential" in info.process


def _read_head(path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _decode_jpeg_plugin(data: bytes, name: str, pillow_error: Exception) -> Decoded:
    """JPEG that Pillow cannot open (12-bit lossy, 16-bit lossless, JPEG-LS) -> Decoded, through the
    pylibjpeg decoders of the dicom extra. The stream's own SOF header is checked first (size limit,
    height 0); samples scale by the stream's precision (a P-bit sample / (2^P - 1))."""
    from . import streams
    try:
        info = streams.jpeg_info(data)
    except streams.StreamError as e:
        raise DecodeError(f"{name}: corrupt or truncated image (JPEG: {e})") from None
    if info.width * info.height > MAX_PIXELS:
        raise DecodeError(f"{name}: {info.width}x{info.height} pixels exceeds the decompression-bomb limit of {MAX_PIXELS:,}")
    what = f"{info.precision}-bit {info.process} {'JPEG-LS' if info.kind == 'jpeg-ls' else 'JPEG'}"
    try:
        if info.kind == "jpeg-ls":
            from jpeg_ls import decode as _dec          # pyjpegls
        else:
            from libjpeg import decode as _dec          # pylibjpeg-libjpeg
    except ImportError:
        raise DecodeError(f"{name}: {what} is not supported by Pillow ({_first_line(pillow_error)}); "
                          f"install the dicom extra to decode it: pip install 'cxr-edge[dicom]'") from None
    try:
        a = np.asarray(_dec(np.frombuffer(data, np.uint8) if info.kind == "jpeg-ls" else data))
    except Exception as e:
        raise DecodeError(f"{name}: corrupt {what} ({type(e).__name__}: {_first_line(e)})") from None
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.shape[:2] != (info.height, info.width):
        raise DecodeError(f"{name}: decoded {a.shape[1]}x{a.shape[0]} pixels, the stream header says {info.width}x{info.height}")
    scale = np.float32((1 << info.precision) - 1)
    if a.ndim == 3:
        gray = (a[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / scale
    else:
        gray = a.astype(np.float32) / scale
    meta = {"format": "JPEG", "mode": f"{info.precision}-bit", "bits": info.precision, "process": info.process,
            "decoder": "pyjpegls" if info.kind == "jpeg-ls" else "pylibjpeg-libjpeg"}
    gray = np.ascontiguousarray(gray.clip(0, 1), dtype=np.float32)
    return Decoded(gray, name, (info.width, info.height), meta)


def _from_pil(img: Image.Image, name: str, min_side: int | None, threads: int = 1) -> Decoded:
    original = img.size
    fmt = img.format
    if fmt == "JPEG" and min_side and img.mode in ("L", "RGB", "CMYK"):
        # DCT-domain downscale by 1/2, 1/4 or 1/8 while both sides stay >= min_side: the cheapest
        # speed-up in the pipeline. Pillow keeps the result >= the requested size.
        img.draft("L" if img.mode != "CMYK" else img.mode, (min_side, min_side))
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1 and fmt in ("TIFF",):
        raise DecodeError(f"{name}: multi-page {fmt} ({n_frames} frames); one radiograph per file expected")
    # Load the pixels BEFORE reading EXIF: PNG's getexif() loads the image itself, and a load error
    # swallowed there would leave a half-decoded image that a second load() returns silently.
    img.load()
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
    finite = False
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img)
        if a.dtype != np.uint16 and mode != "I":
            a = a.astype(np.uint16)
        # PNG/TIFF 16-bit: full 16-bit scale unless the file says otherwise.
        bits = 16
        meta["bits"] = bits
        if a.dtype == np.uint16:   # one table lookup, the same float32 values as the division below
            from .dicom_lut import u16_to_unit
            gray = u16_to_unit(a, threads)
            finite = True          # a constant, finite table
        else:
            gray = (a.astype(np.float32) / np.float32(65535.0)).clip(0, 1)
    elif mode == "F":
        a = np.asarray(img, dtype=np.float32)
        _check_finite(a, name)   # the min/max scaling below would spread one NaN/inf over every pixel
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
    return Decoded(np.ascontiguousarray(gray, dtype=np.float32), name, original, meta, finite=finite)


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


# The stored value -> 0..1 mapping (modality, VOI LUT / window, MONOCHROME1) lives in dicom_lut.


def _no_force(msg: str) -> str:
    """pydicom's messages suggest `force=True`, an option neither our CLI nor our API has: drop
    every sentence that mentions it."""
    kept = [x for x in re.split(r"(?<=[.;])\s+", msg) if "force" not in x.lower()]
    return " ".join(kept).strip() or "not a DICOM file"


_DEFLATED = b"1.2.840.10008.1.2.1.99"
_MAX_INFLATED = MAX_PIXELS * 8 + (64 << 20)      # the largest data set a deflated file may expand to


def _read_dataset(pydicom, fp, name: str):
    """dcmread, plus: bare data sets without preamble/"DICM"/file meta (read with force=True, the
    encoding guessed by pydicom from the first element), a bounded inflate check for Deflated
    Explicit VR files (a zip bomb would otherwise expand in memory unchecked), and messages that
    never tell the user to "use force=True"."""
    from pydicom.errors import InvalidDicomError

    def read_head(n):
        if isinstance(fp, io.BytesIO):
            return fp.getvalue()[:n]
        with open(fp, "rb") as f:
            return f.read(n)

    head = read_head(1 << 16)
    if _DEFLATED in head:
        _check_inflated_size(fp, name)
    try:
        ds = pydicom.dcmread(fp)
    except InvalidDicomError:
        enc = _raw_dicom_encoding(head[:16])
        if enc is None:
            raise DecodeError(f"{name}: not a readable DICOM file (no DICOM preamble and 'DICM' prefix, and the data "
                              "does not start with a DICOM data element)") from None
        if isinstance(fp, io.BytesIO):
            fp.seek(0)
        try:
            ds = pydicom.dcmread(fp, force=True)
        except Exception as e:
            raise DecodeError(f"{name}: not a readable DICOM file (data set without preamble, {enc} endian: "
                              f"{type(e).__name__}: {_no_force(_first_line(e))})") from None
        warnings.warn(f"no DICOM preamble or file meta: read as a bare data set ({enc} endian)")
    except Exception as e:  # pydicom raises many types for malformed files
        raise DecodeError(f"{name}: not a readable DICOM file ({type(e).__name__}: {_no_force(_first_line(e))})") from None
    return ds


def _check_inflated_size(fp, name: str) -> None:
    """Deflated Explicit VR Little Endian: inflate the body in 16 MB steps, counting (not keeping)
    the output, and refuse it past _MAX_INFLATED bytes, before pydicom inflates it whole. The body
    starts after the file meta, whose (0002,0000) group length says where."""
    import zlib
    data = fp.getvalue() if isinstance(fp, io.BytesIO) else Path(fp).read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return          # no group length to find the body by: pydicom decides
    start = 144 + struct.unpack_from("<I", data, 140)[0]
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    total, rest = 0, memoryview(data)[start:]
    try:
        while rest and total <= _MAX_INFLATED:
            total += len(z.decompress(rest, 1 << 24))
            rest = z.unconsumed_tail
            if z.eof:
                break
    except zlib.error:
        return          # not deflate data: pydicom's reader says what is wrong
    if total > _MAX_INFLATED:
        raise DecodeError(f"{name}: deflated data set expands to more than {_MAX_INFLATED:,} bytes "
                          f"(from {len(data):,}); refused as a decompression bomb")


_TS_KIND = {"1.2.840.10008.1.2.5": "rle", "1.2.840.10008.1.2.4.80": "jpeg-ls", "1.2.840.10008.1.2.4.81": "jpeg-ls"}
_TS_KIND.update({f"1.2.840.10008.1.2.4.{n}": "jpeg" for n in range(50, 71)})
_TS_KIND.update({f"1.2.840.10008.1.2.4.{n}": "jpeg2000" for n in (90, 91, 92, 93, 201, 202, 203)})


def _check_pixel_stream(pydicom, ds, name: str, rows: int, cols: int, photometric: str):
    """Check the pixel data against the header BEFORE any decoder runs; return the transfer syntax
    to decode with (set into ds.file_meta when it had to be guessed or corrected).

    Encapsulated data: the first frame's own header (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ, RLE
    segment table) must parse, stay within MAX_PIXELS, match Rows x Columns and SamplesPerPixel.
    A transfer syntax that names another format than the stream is corrected (warning); a missing
    one (no file meta) is guessed from the stream, or for native data from the encoding the data
    set was read with (warning). Raises DecodeError naming the mismatch."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from . import streams

    fm = getattr(ds, "file_meta", None)
    ts = fm.get("TransferSyntaxUID") if fm is not None else None
    raw_pi = str(ds.get("PhotometricInterpretation", "") or "")
    if raw_pi and raw_pi != photometric and raw_pi.strip().upper() == photometric.strip():
        warnings.warn(f"PhotometricInterpretation {raw_pi!r} is not upper case; read as {photometric.strip()}")
        ds.PhotometricInterpretation = photometric.strip()
    try:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_alloc = int(ds.get("BitsAllocated", 8) or 8)
    except (TypeError, ValueError) as e:
        raise DecodeError(f"{name}: malformed image header ({e})") from None
    if photometric.startswith("MONOCHROME") and samples != 1:
        raise DecodeError(f"{name}: header says {photometric} but {samples} samples per pixel; a grayscale "
                          "image has 1 (refusing rather than guessing which sample is the radiograph)")
    elem = ds["PixelData"]
    encapsulated = bool(getattr(elem, "is_undefined_length", False)) or bool(ts and UID(ts).is_encapsulated)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    little = True if little is None else little
    guessed = info = None
    if not encapsulated:
        if ts is None:
            guessed = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    else:
        value = elem.value
        if not isinstance(value, (bytes, bytearray)):
            raise DecodeError(f"{name}: encapsulated pixel data is not a byte string")
        try:
            frame = streams.encapsulated_frame(bytes(value), little)
            kind = streams.sniff(frame)
            declared = _TS_KIND.get(str(ts)) if ts else None
            if kind is None and (declared == "rle" or (ts is None and len(frame) >= 64
                                                       and frame[4:8] == b"\x40\x00\x00\x00")):
                info = streams.rle_info(frame, samples * ((bits_alloc + 7) // 8))
            elif kind in ("jpeg", "jpeg-ls"):
                info = streams.jpeg_info(frame)
            elif kind == "jpeg2000":
                info = streams.j2k_info(frame)
            else:
                raise streams.StreamError(f"the first fragment does not start like any compressed format "
                                          f"the header could mean (transfer syntax {ts or 'missing'})")
        except streams.StreamError as e:
            raise DecodeError(f"{name}: compressed pixel data refused before decoding: {e}") from None
        if info.kind != "rle":
            if info.width * info.height > MAX_PIXELS:
                raise DecodeError(f"{name}: the {info.kind} stream declares {info.width}x{info.height} pixels, over the "
                                  f"decompression-bomb limit of {MAX_PIXELS:,} (header says {cols}x{rows})")
            if (info.width, info.height) != (cols, rows):
                raise DecodeError(f"{name}: the {info.kind} stream declares {info.width}x{info.height} pixels but the "
                                  f"header says Columns x Rows = {cols}x{rows}")
            if info.components != samples:
                what = "colour (e.g. YCbCr/RGB)" if info.components == 3 else f"{info.components}-component"
                raise DecodeError(f"{name}: the {info.kind} stream holds {info.components} components ({what}) but the "
                                  f"header says {samples} sample(s) per pixel, {photometric}; refusing rather than "
                                  "guessing which is right")
            if info.precision is not None:
                try:
                    declared_bits = int(ds.get("BitsStored", info.precision))
                except (TypeError, ValueError):
                    declared_bits = info.precision
                if declared_bits != info.precision:
                    warnings.warn(f"BitsStored {declared_bits} but the {info.kind} stream's own precision is "
                                  f"{info.precision} bits")
        if declared is not None and declared != info.kind:
            warnings.warn(f"transfer syntax {getattr(ts, 'name', ts)} names {declared} but the pixel data is "
                          f"{info.kind}; decoded as {info.kind}")
            guessed = info.transfer_syntax
        elif ts is None:
            guessed = info.transfer_syntax
    if guessed:
        if fm is None:
            ds.file_meta = fm = FileMetaDataset()
        if ts is None:
            warnings.warn(f"no transfer syntax in the file: decoded as {UID(guessed).name}, from the data")
        ds.file_meta.TransferSyntaxUID = UID(guessed)
        ts = ds.file_meta.TransferSyntaxUID
    return ts, info


def _decode_dicom(fp, name: str, threads: int = 1) -> Decoded:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        try:
            import pydicom
            from pydicom.pixel_data_handlers.util import apply_modality_lut
        except ImportError:
            raise DecodeError(f"{name}: DICOM support needs pydicom: pip install 'cxr-edge[dicom]'") from None
    ds = _read_dataset(pydicom, fp, name)
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
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"{name}: image header declares {cols}x{rows} pixels")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    # The compressed stream's own header (size, components, precision) is checked here, before any
    # plugin allocates; files without file meta get their transfer syntax from what the data shows.
    ts, stream = _check_pixel_stream(pydicom, ds, name, rows, cols, photometric)
    ts_name = getattr(ts, "name", str(ts))
    try:
        from .dicom_lut import native_stored
        raw = native_stored(ds)   # uncompressed grayscale: a view on Pixel Data, masked by the LUT below
        stored = raw if raw is not None else ds.pixel_array
        if stored.dtype.byteorder == (">" if np.little_endian else "<"):   # Explicit VR Big Endian (retired)
            stored = stored.astype(stored.dtype.newbyteorder("="))
    except Exception as e:
        msg = str(e).strip()
        first_line = msg.splitlines()[0].rstrip(": ") if msg else type(e).__name__
        raise DecodeError(f"{name}: cannot decode pixel data with transfer syntax {ts_name}: {_no_force(first_line)}"
                          f"{_missing_plugin_hint(ts) if ts is not None else ''}") from None
    try:
        bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
    except (TypeError, ValueError):
        bits = 8 * stored.dtype.itemsize
    if not 1 <= bits <= 32:
        raise DecodeError(f"{name}: BitsStored {bits} is invalid")
    meta = {"format": "DICOM", "modality": modality, "photometric": photometric, "bits_stored": bits,
            "transfer_syntax": str(ts) if ts else None,
            # read by the input guard (guard.py): a non-chest body part or a lateral view warns
            "body_part": str(ds.get("BodyPartExamined", "") or "").strip().upper(),
            "view_position": str(ds.get("ViewPosition", "") or "").strip().upper()}
    if stream is not None:   # what the compressed stream itself declares (its precision may contradict BitsStored)
        meta["stream"] = {"kind": stream.kind, "process": stream.process, "precision": stream.precision,
                          "components": stream.components}
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
        # One composed lookup table (modality -> VOI -> MONOCHROME1 -> 0..1 float32): dicom_lut.
        from .dicom_lut import InvalidWindow, stored_to_gray
        gray = stored_to_gray(stored, ds, bits, photometric, name, meta, native_raw=raw is not None,
                              threads=threads)
    except InvalidWindow as e:
        raise DecodeError(str(e)) from None
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DecodeError(f"{name}: malformed grayscale transform in the DICOM header ({type(e).__name__}: {e})") from None
    return Decoded(np.ascontiguousarray(gray), name, (gray.shape[1], gray.shape[0]), meta, finite=True)
