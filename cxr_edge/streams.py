"""Compressed pixel streams: what their OWN headers declare, read before any pixel buffer exists.

A DICOM header's Rows x Columns is only a claim; the JPEG / JPEG-LS / JPEG 2000 / RLE stream inside
carries its own dimensions, and a decoder plugin allocates from those. Decode (decode.py) therefore
parses the stream header here first, refuses sizes over the pixel limit or that disagree with the
DICOM header, and only then lets a decoder run. Everything here is pure Python over `bytes`, reads
at most a few hundred header bytes per marker, and never loops without consuming input, so a
hostile stream costs microseconds.

Errors: every parser raises `StreamError` (a ValueError) with a short cause; callers add the name.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass


class StreamError(ValueError):
    """A compressed stream's header is malformed or declares an impossible image."""


@dataclass(frozen=True)
class StreamInfo:
    """The image a compressed stream's own header declares.

    kind: "jpeg", "jpeg-ls", "jpeg2000" or "rle"; width/height in pixels; components: samples per
    pixel; precision: bits per sample (None for RLE: its header has none); process: a short name
    (e.g. "baseline", "extended", "lossless", "progressive", "near-lossless"); transfer_syntax: the
    DICOM transfer syntax UID this stream most likely came with (the guess for files without file meta).
    """
    kind: str
    width: int
    height: int
    components: int
    precision: int | None
    process: str
    transfer_syntax: str


# JPEG start-of-frame markers (ITU T.81 B.1.1.3): C0..CF without DHT (C4), JPG (C8), DAC (CC)
_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless",
        0xC5: "differential sequential", 0xC6: "differential progressive", 0xC7: "differential lossless",
        0xC9: "extended (arithmetic)", 0xCA: "progressive (arithmetic)", 0xCB: "lossless (arithmetic)",
        0xCD: "differential sequential (arithmetic)", 0xCE: "differential progressive (arithmetic)",
        0xCF: "differential lossless (arithmetic)"}
_STANDALONE = set(range(0xD0, 0xD8)) | {0x01, 0xD8}
_MAX_MARKERS = 4096          # a real header has a few dozen segments before the scan


def jpeg_info(data: bytes) -> StreamInfo:
    """JPEG (T.81) or JPEG-LS (T.87) stream -> StreamInfo, from its SOFn / SOF55 segment.

    Scans marker segments from SOI up to the first scan (SOS); raises StreamError when there is no
    SOI, a segment runs past the end, or the frame header declares 0 width/height/components.
    Height 0 (T.81's "defined later by a DNL marker") is refused: the size cannot be checked before
    decoding, which is exactly what lets a decoder allocate without bound."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise StreamError("no JPEG start-of-image marker")
    pos, n = 2, 0
    sof = None
    while pos < len(data) and n < _MAX_MARKERS:
        n += 1
        if data[pos] != 0xFF:
            raise StreamError(f"expected a marker at byte {pos}, found 0x{data[pos]:02X}")
        while pos < len(data) and data[pos] == 0xFF:   # fill bytes
            pos += 1
        if pos >= len(data):
            break
        m = data[pos]
        pos += 1
        if m in _STANDALONE:
            continue
        if m == 0xD9:
            break
        if pos + 2 > len(data):
            raise StreamError("truncated marker segment")
        length = struct.unpack_from(">H", data, pos)[0]
        if length < 2 or pos + length > len(data):
            raise StreamError(f"marker 0x{m:02X} segment length {length} runs past the end of the stream")
        seg = data[pos + 2:pos + length]
        if m in _SOF or m == 0xF7:
            if len(seg) < 6:
                raise StreamError("frame header too short")
            p, y, x, nf = seg[0], *struct.unpack_from(">HH", seg, 1), seg[5]
            sof = (m, p, y, x, nf)
        elif m == 0xDA:               # start of scan: the frame header must have come first
            if sof is None:
                raise StreamError("scan before any frame header")
            ns = seg[0] if seg else 0
            rest = seg[1 + 2 * ns:]   # Ss (predictor / NEAR), Se, Ah/Al
            ss = rest[0] if rest else 0
            return _jpeg_result(*sof, ss)
        pos += length
    if sof is None:
        raise StreamError("no frame header (SOF) before the end of the stream")
    return _jpeg_result(*sof, 0)


def _jpeg_result(marker, p, y, x, nf, ss) -> StreamInfo:
    ls = marker == 0xF7
    kind = "jpeg-ls" if ls else "jpeg"
    if y == 0:
        raise StreamError(f"{kind} frame header declares height 0 (size deferred to a DNL/LSE marker); "
                          "its size cannot be checked before decoding")
    if x == 0 or nf == 0:
        raise StreamError(f"{kind} frame header declares width {x}, {nf} components")
    if not 2 <= p <= 16:
        raise StreamError(f"{kind} frame header declares {p}-bit samples")
    if ls:
        process = "lossless" if ss == 0 else "near-lossless"
        ts = "1.2.840.10008.1.2.4.80" if ss == 0 else "1.2.840.10008.1.2.4.81"
    else:
        process = _SOF[marker]
        ts = {0xC0: "1.2.840.10008.1.2.4.50", 0xC1: "1.2.840.10008.1.2.4.51", 0xC2: "1.2.840.10008.1.2.4.51",
              0xC3: "1.2.840.10008.1.2.4.70" if ss == 1 else "1.2.840.10008.1.2.4.57"}.get(marker, "")
    return StreamInfo(kind, x, y, nf, p, process, ts)


def j2k_info(data: bytes) -> StreamInfo:
    """JPEG 2000 codestream (or JP2 file) -> StreamInfo from its SIZ marker segment (T.800 A.5.1)."""
    if data[:4] == b"\x00\x00\x00\x0c" and data[4:8] == b"jP  ":
        data = _jp2_codestream(data)
    if len(data) < 4 or data[:4] != b"\xff\x4f\xff\x51":
        raise StreamError("no JPEG 2000 SOC + SIZ markers")
    if len(data) < 6 + 36:
        raise StreamError("truncated JPEG 2000 SIZ segment")
    lsiz, _rsiz, xsiz, ysiz, xo, yo, _xt, _yt, _xto, _yto, csiz = struct.unpack_from(">HHIIIIIIIIH", data, 4)
    if lsiz < 41 or 4 + lsiz > len(data) or csiz == 0 or lsiz != 38 + 3 * csiz:
        raise StreamError(f"malformed JPEG 2000 SIZ segment (length {lsiz}, {csiz} components)")
    w, h = xsiz - xo, ysiz - yo
    if w <= 0 or h <= 0:
        raise StreamError(f"JPEG 2000 image area {xsiz}x{ysiz} with offset {xo},{yo} is empty")
    ssiz = data[4 + 38]
    precision = (ssiz & 0x7F) + 1
    if precision > 38:
        raise StreamError(f"JPEG 2000 component precision {precision} bits is invalid")
    # COD (T.800 A.6.1): wavelet 1 = 5-3 reversible (lossless), 0 = 9-7 irreversible
    lossless = None
    cod = data.find(b"\xff\x52", 4 + lsiz, 4 + lsiz + 512)
    if cod > 0 and cod + 14 <= len(data):
        lossless = data[cod + 13] == 1
    ts = "1.2.840.10008.1.2.4.90" if lossless in (True, None) else "1.2.840.10008.1.2.4.91"
    return StreamInfo("jpeg2000", w, h, csiz, precision, "lossless" if lossless else "lossy" if lossless is False else "unknown", ts)


def _jp2_codestream(data: bytes) -> bytes:
    pos = 0
    for _ in range(64):
        if pos + 8 > len(data):
            break
        lbox, tbox = struct.unpack_from(">I4s", data, pos)
        head = 8
        if lbox == 1:
            if pos + 16 > len(data):
                break
            lbox, head = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif lbox == 0:
            lbox = len(data) - pos
        if tbox == b"jp2c":
            return data[pos + head:pos + lbox]
        if lbox < head:
            break
        pos += lbox
    raise StreamError("JP2 file without a contiguous codestream box")


def rle_info(data: bytes, expected_segments: int) -> StreamInfo:
    """DICOM RLE (PS3.5 G.3) frame -> StreamInfo (width/height 0: the header has no size; the
    decoder allocates from Rows x Columns, which the caller checks). Checks the segment count
    (1..15, and equal to samples x bytes per sample) and that every offset is ascending and
    inside the frame."""
    if len(data) < 64:
        raise StreamError(f"RLE frame of {len(data)} bytes is shorter than its 64-byte header")
    header = struct.unpack_from("<16I", data, 0)
    nseg = header[0]
    if not 1 <= nseg <= 15:
        raise StreamError(f"RLE header declares {nseg} segments (1..15 allowed)")
    if nseg != expected_segments:
        raise StreamError(f"RLE header declares {nseg} segments, the DICOM header implies {expected_segments}")
    offsets = header[1:1 + nseg]
    if offsets[0] != 64 or any(b <= a for a, b in zip(offsets, offsets[1:])) or offsets[-1] >= len(data):
        raise StreamError(f"RLE segment offsets {list(offsets)} are not ascending inside the {len(data)}-byte frame")
    return StreamInfo("rle", 0, 0, nseg, None, "lossless", "1.2.840.10008.1.2.5")


def sniff(data: bytes) -> str | None:
    """Which compressed format a frame's first bytes show: "jpeg", "jpeg-ls", "jpeg2000" or None."""
    if data[:2] == b"\xff\xd8":
        try:
            return jpeg_info(data).kind
        except StreamError:
            return "jpeg"
    if data[:4] == b"\xff\x4f\xff\x51" or data[4:8] == b"jP  ":
        return "jpeg2000"
    return None


def encapsulated_frame(value: bytes, little_endian: bool = True, limit: int = 1 << 20) -> bytes:
    """The first frame of encapsulated Pixel Data (PS3.5 A.4): the fragments after the Basic Offset
    Table joined, reading item headers only (at most `limit` bytes are returned: enough for every
    header parsed here). Raises StreamError on a malformed item sequence."""
    e = "<" if little_endian else ">"
    pos, out, size, first = 0, [], 0, True
    for _ in range(1 << 16):
        if pos + 8 > len(value):
            break
        group, elem, length = struct.unpack_from(e + "HHI", value, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):
            break
        if (group, elem) != (0xFFFE, 0xE000):
            raise StreamError(f"encapsulated pixel data: expected an item tag at byte {pos}, found ({group:04X},{elem:04X})")
        if length == 0xFFFFFFFF or pos + 8 + length > len(value):
            raise StreamError(f"encapsulated pixel data: item of {length} bytes runs past the end")
        if not first:
            out.append(value[pos + 8:pos + 8 + min(length, limit - size)])
            size += len(out[-1])
            if size >= limit:
                break
        first = False
        pos += 8 + length
    if not out:
        raise StreamError("encapsulated pixel data holds no fragment")
    return b"".join(out)
