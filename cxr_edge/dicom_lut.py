"""DICOM stored values -> 0..1 grayscale in one pass: one composed lookup table per image.

The grayscale pipeline of PS3.3 C.11 — Modality LUT or Rescale Slope/Intercept, then a VOI LUT
or a window (LINEAR, LINEAR_EXACT or SIGMOID, C.11.2.1.2), or without either the stored range
carried through the modality transform, then MONOCHROME1 inversion — is a function of the stored
value alone. For integer pixels of at most 16 bits this module evaluates that function once for
every possible stored value (256 or 65 536 of them, in float64, exactly as a per-pixel evaluation
would) and maps the image with a single table lookup into float32: no full-resolution float64
temporaries, and the same values the per-pixel chain gives (bit for bit: the same elementwise
float64 operations on the same inputs, one rounding to float32 at the end).

Header values that the data contradicts (issue 13, kind A) are resolved in favour of the data,
with a warning naming the file and both values (``meta["warnings"]``):

- a VOI LUT whose descriptor claims more bits per entry than its largest entry needs by 2 or
  more (e.g. descriptor 16, every entry <= 4095: several vendors write this), or fewer bits than
  its entries carry: scaled by the bits the entries prove (bit length of the largest entry);
- without a window or VOI LUT (the image's scale comes from Bits Stored): pixel values beyond
  2^BitsStored - 1, or a Bits Stored at least 2 bits above what the largest stored value needs
  (e.g. Bits Stored 16 from a 12-bit stream): scaled by the bits the pixel data proves.
"""
from __future__ import annotations

import numpy as np

from .bands import run_bands

# Elements per chunk of the lookup: the index conversion numpy makes for `take` stays in cache.
_CHUNK = 1 << 17


def first_number(v) -> float:
    """First value of a possibly multi-valued DICOM number (window centre/width may list several)."""
    try:
        return float(v[0]) if not isinstance(v, (str, bytes)) and hasattr(v, "__len__") else float(v)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"not a number: {v!r}") from None


def _modality_lut():
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2
        from pydicom.pixel_data_handlers.util import apply_modality_lut
    return apply_modality_lut


def voi_lut_table(item, ds) -> tuple[np.ndarray, int, int, int]:
    """(entries as float64, number of entries n, first mapped value, bits per entry as declared)."""
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
    return lut[:n].astype(np.float64), n, first, out_bits


def apply_voi_lut(values: np.ndarray, table: np.ndarray, first: int, out_bits: int) -> np.ndarray:
    """VOI LUT (PS3.3 C.11.2.1.1) of float64 modality values -> float64 0..1. pydicom's apply_voi
    indexes through an array of the LUT's own entry type (8-bit LUTs wrap indices >= 256), so
    the lookup is done here."""
    n = table.size
    idx = np.clip(np.rint(values) - first, 0, n - 1).astype(np.intp)
    return (table[idx] / ((1 << out_bits) - 1)).clip(0, 1)


def apply_window(values: np.ndarray, c: float, w: float, function: str) -> np.ndarray:
    """VOI window (PS3.3 C.11.2.1.2/3) of float64 modality values -> float64 0..1."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # exp overflow far below the window is 0, as it should be
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
    if function == "LINEAR_EXACT":
        return ((values - c) / w + 0.5).clip(0, 1)
    if w == 1:  # LINEAR with width 1 is a threshold (the formula's w - 1 would divide by zero)
        return (values >= c - 0.5).astype(np.float64)
    return ((values - (c - 0.5)) / (w - 1) + 0.5).clip(0, 1)


class InvalidWindow(ValueError):
    """A window the VOI function cannot use (width < 1 for LINEAR, <= 0 otherwise)."""


def _proven_bits(declared: int, largest: int) -> int | None:
    """Bits the data proves when they contradict the declared bits, else None."""
    have = max(int(largest), 0).bit_length()
    if have > declared or (have >= 8 and declared - have >= 2):
        return have
    return None


def _stored_max(stored: np.ndarray) -> int:
    return int(stored.max()) if stored.size else 0


class GrayTransform:
    """The grayscale transform of one data set, resolved once: call it on float-convertible stored
    values (an array of any shape) to get float64 0..1 in the MONOCHROME2 sense."""

    def __init__(self, ds, dtype: np.dtype, largest, bits: int, photometric: str, name: str, meta: dict):
        """`dtype`: the stored values' dtype; `largest()`: the largest stored value (asked only when
        Bits Stored alone sets the scale)."""
        self.ds, self.photometric = ds, photometric
        self.apply_modality_lut = _modality_lut()
        self.signed = int(ds.get("PixelRepresentation", 0)) == 1
        self.kind = "range"
        warnings = meta.setdefault("warnings", [])
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is not None and width is not None and str(center) != "" and str(width) != "":
            c, w = first_number(center), first_number(width)
            function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            if (function == "LINEAR" and w < 1) or not w > 0:
                raise InvalidWindow(f"{name}: window width {w} is invalid for a {function} VOI function")
            self.kind, self.window = "window", (c, w, function)
            meta["window"] = (c, w)
            if function != "LINEAR":
                meta["voi_function"] = function
        elif ds.get("VOILUTSequence"):
            table, n, first, out_bits = voi_lut_table(ds.VOILUTSequence[0], ds)
            largest = int(table.max()) if n else 0
            proven = _proven_bits(out_bits, largest)
            if proven is not None:
                warnings.append(f"{name}: VOI LUT Descriptor says {out_bits} bits per entry but its largest entry is "
                                f"{largest} ({proven} bits): scaled as {proven}-bit")
                out_bits = proven
            self.kind, self.voi = "voi_lut", (table, first, out_bits)
            meta["voi_lut"] = True
        else:
            if not self.signed and dtype.kind in "ui":
                largest = int(largest())
                proven = _proven_bits(bits, largest)
                if proven is not None:
                    warnings.append(f"{name}: BitsStored says {bits} but the largest stored value is {largest} "
                                    f"({proven} bits), and no window sets the scale: scaled as {proven}-bit")
                    bits = proven
                    meta["bits_proven"] = proven
            lo_s, hi_s = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.signed else (0, (1 << bits) - 1)
            # Range of the stored values, carried through the same LUTs as the pixels, gives the scale.
            dt = dtype if np.can_cast(np.min_scalar_type(hi_s), dtype) and \
                np.can_cast(np.min_scalar_type(lo_s), dtype) else np.int64
            rng = self.apply_modality_lut(np.array([lo_s, hi_s], dtype=dt), ds).astype(np.float64)
            self.range = (float(min(rng)), float(max(rng)))
        if not meta["warnings"]:
            del meta["warnings"]

    def __call__(self, stored_values: np.ndarray) -> np.ndarray:
        values = self.apply_modality_lut(stored_values, self.ds).astype(np.float64)
        if self.kind == "window":
            gray = apply_window(values, *self.window)
        elif self.kind == "voi_lut":
            gray = apply_voi_lut(values, *self.voi)
        else:
            lo, hi = self.range
            gray = ((values - lo) / (hi - lo)).clip(0, 1) if hi > lo else np.zeros_like(values)
        if self.photometric == "MONOCHROME1":
            gray = 1.0 - gray
        return gray


def take_lut(lut: np.ndarray, index: np.ndarray, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """lut[index] into float32 `out` (index: unsigned integers < lut.size), chunk by chunk;
    threads > 1 splits the chunks over that many threads (`bands.run_bands`; same values)."""
    flat_i = np.ascontiguousarray(index).reshape(-1)
    if out is None:
        out = np.empty(index.shape, np.float32)
    flat_o = out.reshape(-1)

    def chunks(c0: int, c1: int) -> None:
        for s in range(c0 * _CHUNK, min(c1 * _CHUNK, flat_i.size), _CHUNK):
            np.take(lut, flat_i[s:s + _CHUNK], out=flat_o[s:s + _CHUNK], mode="clip")

    run_bands(chunks, 0, -(-flat_i.size // _CHUNK), threads)
    return out


_U16_UNIT = None


def u16_to_unit(a: np.ndarray, threads: int = 1) -> np.ndarray:
    """uint16 -> float32 v / 65535 (numpy's float32 division, bit for bit) through one table
    (`threads`: as in take_lut)."""
    global _U16_UNIT
    if _U16_UNIT is None:
        _U16_UNIT = (np.arange(65536, dtype=np.uint16).astype(np.float32) / np.float32(65535.0)).clip(0, 1)
    return take_lut(_U16_UNIT, a, threads=threads)


NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian


def native_stored(ds) -> np.ndarray | None:
    """The stored bit patterns of an uncompressed single-frame grayscale data set as a read-only
    uint8/uint16 H x W view on its Pixel Data (no copy), else None (then use ds.pixel_array).
    The bits above Bits Stored are left as they are: `stored_to_gray(..., native_raw=True)` masks
    and sign-extends through its table, as pydicom's pixel_array would."""
    try:
        fm = getattr(ds, "file_meta", None)
        ts = str(fm.get("TransferSyntaxUID", "")) if fm is not None else ""
        if ts not in NATIVE_SYNTAXES:
            return None
        alloc, bits = int(ds.BitsAllocated), int(ds.BitsStored)
        rows, cols = int(ds.Rows), int(ds.Columns)
        if alloc not in (8, 16) or not 1 <= bits <= alloc or int(ds.get("SamplesPerPixel", 1)) != 1 \
                or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("PixelRepresentation", 0)) not in (0, 1) \
                or str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2") \
                or rows <= 0 or cols <= 0:
            return None
        data = ds.PixelData
        if not isinstance(data, (bytes, bytearray)) or len(data) < rows * cols * (alloc // 8):
            return None
        return np.frombuffer(data, dtype="<u1" if alloc == 8 else "<u2", count=rows * cols).reshape(rows, cols)
    except Exception:  # any doubt: pydicom's own pixel_array decides
        return None


def _masked_domain(itemsize: int, bits: int, signed: bool) -> np.ndarray:
    """Every bit pattern k of an itemsize-byte pixel, as pydicom's pixel_array gives its value: the
    bits above Bits Stored cleared, then (signed) sign-extended from bit Bits Stored - 1."""
    n = 8 * itemsize
    k = np.arange(1 << n, dtype=np.int64)
    v = k & ((1 << bits) - 1)
    if signed:
        v = np.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
    return v.astype(np.dtype(f"{'i' if signed else 'u'}{itemsize}"))


def stored_to_gray(stored: np.ndarray, ds, bits: int, photometric: str, name: str, meta: dict,
                   native_raw: bool = False, threads: int = 1) -> np.ndarray:
    """Stored pixel values (H x W integers, or floats) -> float32 H x W in 0..1, 1 = bright.

    The result is finite (ValueError otherwise: e.g. a NaN window centre).
    Integer pixels of <= 16 bits go through one composed table indexed by the stored bit pattern;
    wider integers through a table over their own min..max when that span is <= 2^20 values;
    anything else (float pixel data, huge spans) through the same transform per pixel.
    `native_raw`: `stored` is native_stored()'s unmasked view; the table then also does pydicom's
    masking to Bits Stored and sign extension (same values as from ds.pixel_array).
    `threads`: the table lookup split over that many threads (take_lut; same values).
    Updates `meta` ("window", "voi_function", "voi_lut", "bits_proven", "warnings").
    Raises InvalidWindow or ValueError/TypeError/AttributeError/IndexError/KeyError for malformed
    headers (the caller names the file)."""
    if native_raw:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        domain = _masked_domain(stored.dtype.itemsize, bits, signed)
        mask = (1 << bits) - 1

        def largest():
            m = int(stored.max()) if stored.size else 0
            return m if m <= mask else int(domain[np.unique(stored)].max())

        t = GrayTransform(ds, domain.dtype, largest, bits, photometric, name, meta)
        return take_lut(_finite(t(domain).astype(np.float32)), stored, threads=threads)
    t = GrayTransform(ds, stored.dtype, lambda: _stored_max(stored), bits, photometric, name, meta)
    if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
        udt = np.dtype(f"u{stored.dtype.itemsize}")
        domain = np.arange(1 << (8 * stored.dtype.itemsize), dtype=udt).view(stored.dtype)
        lut = _finite(t(domain).astype(np.float32))
        return take_lut(lut, stored.view(udt.newbyteorder(stored.dtype.byteorder)) if stored.dtype.byteorder not in "=|"
                        else stored.view(udt), threads=threads)
    if stored.dtype.kind in "ui" and stored.size:
        lo, hi = int(stored.min()), int(stored.max())
        if hi - lo < (1 << 20):
            lut = _finite(t(np.arange(lo, hi + 1, dtype=np.int64).astype(stored.dtype)).astype(np.float32))
            return take_lut(lut, (stored.astype(np.int64) - lo), threads=threads)
    return _finite(t(stored).astype(np.float32))


def _finite(values: np.ndarray) -> np.ndarray:
    """values, when all are finite; else ValueError. Checking the table (<= 65 536 entries) instead of
    the image it maps to makes every output finite by construction: decode() need not scan the
    full-resolution result again (Decoded.finite)."""
    if not np.isfinite(values).all():
        raise ValueError("the grayscale transform maps stored values to NaN or infinity")
    return values
