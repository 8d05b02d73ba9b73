"""Hostile and unusual inputs (issue 13, kinds B, C, D, warnings): each test builds a small input
in memory or in tmp_path and fails if the kind comes back. Kind A (DICOM pixel-value mapping) is
tested with the LUT module. Nothing here reads a real image."""
from __future__ import annotations

import io
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_edge.decode import BYTES_PER_PIXEL, MAX_PIXELS, DecodeError, decode, estimate_bytes

import hostile_inputs as H

pydicom = pytest.importorskip("pydicom")
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1,  # noqa: E402
                         JPEGLSLossless, RLELossless)

CORPUS = Path(__file__).parent / "corpus" / "decode"
RNG = np.random.default_rng(13)
G8 = RNG.integers(0, 256, (24, 40)).astype(np.uint8)
G12 = RNG.integers(0, 4096, (24, 40)).astype(np.uint16)
G16 = RNG.integers(0, 65536, (24, 40)).astype(np.uint16)


def _refused(item, *patterns):
    with pytest.raises(DecodeError) as e:
        decode(item)
    msg = str(e.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    assert "force=True" not in msg and "Traceback" not in msg
    return msg


# == Kind B: decodable inputs that were refused ===================================================
@pytest.mark.parametrize("implicit,little", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("name", ["IM000001", "IM000001.dcm"])
def test_dicom_without_preamble_or_file_meta(tmp_path, implicit, little, name):
    ds = H.dicom_dataset(G12, bits_stored=12)
    data = H.dicom_bytes(ds, preamble=False, implicit=implicit, little=little)
    assert b"DICM" not in data[:200] and data[:2] in (b"\x08\x00", b"\x00\x08")      # really bare: group 8 first
    p = tmp_path / name
    p.write_bytes(data)
    ref = decode(H.dicom_bytes(ds)).pixels
    for item, src in ((p, str(p)), (data, "<bytes>")):
        d = decode(item)
        assert np.array_equal(d.pixels, ref)
        enc = "implicit little" if implicit else f"explicit {'little' if little else 'big'}"
        assert any(src in w and enc in w for w in d.meta["warnings"]), d.meta["warnings"]


def test_not_dicom_never_says_force(tmp_path):
    p = tmp_path / "fake.dcm"
    p.write_bytes(b"\0" * 200 + b"not a dicom file")
    msg = _refused(p, "fake.dcm: not a readable DICOM file")
    assert "force" not in msg.lower()


def test_compressed_dicom_without_file_meta_guesses_transfer_syntax():
    """No file meta at all: the transfer syntax comes from what the stream is."""
    for stream, ts, arr, scale in ((H.jpeg_lossless(G12, 12), JPEGLosslessSV1, G12, 4095),
                                   (H.pillow_jpeg(G8, quality=100), JPEGBaseline8Bit, None, 255)):
        ds = H.encapsulated_dicom(stream, 24, 40, ts, bits=12 if scale == 4095 else 8)
        d = decode(H.dicom_bytes(ds, preamble=False))
        assert d.meta["transfer_syntax"] == ts
        if arr is not None:
            np.testing.assert_allclose(d.pixels, arr / scale, atol=1e-6)
        assert any("decoded as" in w for w in d.meta["warnings"])


def test_transfer_syntax_contradicting_the_stream_is_corrected():
    ds = H.encapsulated_dicom(H.jpeg_lossless(G12, 12), 24, 40, JPEGBaseline8Bit, bits=12)   # header lies
    d = decode(H.dicom_bytes(ds))
    np.testing.assert_allclose(d.pixels, G12 / 4095, atol=1e-6)
    assert any("names jpeg" not in w and "pixel data is jpeg" not in w for w in d.meta.get("warnings", [""]))
    ds = H.encapsulated_dicom(H.jpeg_lossless(G12, 12), 24, 40, RLELossless, bits=12)
    d = decode(H.dicom_bytes(ds))
    np.testing.assert_allclose(d.pixels, G12 / 4095, atol=1e-6)
    assert any("names rle but the pixel data is jpeg" in w for w in d.meta["warnings"]), d.meta


@pytest.mark.parametrize("kind", ["12-bit lossy", "16-bit lossless", "12-bit lossless"])
def test_jpeg_pillow_cannot_open(tmp_path, kind):
    blocks = RNG.integers(0, 4096, (3, 5))
    stream, ref = {"12-bit lossy": (H.jpeg12_dc_only(blocks), np.kron(blocks, np.ones((8, 8))) / 4095),
                   "16-bit lossless": (H.jpeg_lossless(G16, 16), G16 / 65535),
                   "12-bit lossless": (H.jpeg_lossless(G12, 12), G12 / 4095)}[kind]
    with pytest.raises(Exception):              # the kind exists: Pillow really cannot decode these
        Image.open(io.BytesIO(stream)).load()
    p = tmp_path / "scan.jpg"
    p.write_bytes(stream)
    for item in (p, stream):
        d = decode(item)
        assert d.meta["bits"] in (12, 16) and d.meta["format"] == "JPEG"
        np.testing.assert_allclose(d.pixels, ref, atol=1e-6)
        assert d.original_size == (ref.shape[1], ref.shape[0])


def test_jpeg_plugin_missing_named(tmp_path):
    p = tmp_path / "lossless.jpg"
    p.write_bytes(H.jpeg_lossless(G16, 16))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["libjpeg"] = None
        from cxr_edge.decode import decode, DecodeError
        try:
            decode({str(p)!r})
        except DecodeError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "lossless.jpg: 16-bit lossless JPEG is not supported by Pillow" in out and "cxr-edge[dicom]" in out, out


def test_big_endian_arrays():
    be = G12.astype(">u2")
    assert be.dtype.byteorder == ">"
    np.testing.assert_array_equal(decode(be, bits_stored=12).pixels, decode(G12, bits_stored=12).pixels)
    f = (G8 / 255.0).astype(">f4")
    np.testing.assert_allclose(decode(f).pixels, G8 / 255.0, atol=1e-6)
    rgb = np.dstack([G12] * 3).astype(">u2")
    with pytest.raises(DecodeError):
        decode(rgb)          # uint16 colour still needs a stated scale: refused, not mis-scaled


def test_colour_jpeg_in_monochrome_dicom_named():
    rgb = np.dstack([G8, 255 - G8, G8 // 2])
    stream = H.pillow_jpeg(rgb, "RGB")          # 3-component YCbCr JPEG
    ds = H.encapsulated_dicom(stream, 24, 40, JPEGBaseline8Bit, samples=1, photometric="MONOCHROME2")
    _refused(H.dicom_bytes(ds), "<bytes>: the jpeg stream holds 3 components", "MONOCHROME2", "1 sample")
    ds = H.dicom_dataset(rgb, "RGB", 8)
    ds.PhotometricInterpretation = "MONOCHROME2"            # header: grayscale, 3 samples
    _refused(H.dicom_bytes(ds), "MONOCHROME2 but 3 samples per pixel")


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")   # pydicom, while the test WRITES the header
def test_photometric_case_tolerated():
    ds = H.dicom_dataset(G8)
    ds.PhotometricInterpretation = "monochrome2"
    d = decode(H.dicom_bytes(ds))
    assert np.array_equal(d.pixels, G8 / np.float32(255))
    assert any("not upper case" in w for w in d.meta["warnings"])


# == Kind C: stream headers checked before any pixel buffer; every failure a DecodeError ==============
def _sof0_dicom() -> bytes:
    """The 868-byte kind: a JPEG-baseline DICOM whose JPEG SOF says height 0."""
    stream = H.patch_sof(H.pillow_jpeg(np.full((8, 8), 100, np.uint8)), height=0)
    return H.dicom_bytes(H.encapsulated_dicom(stream, 8, 8, JPEGBaseline8Bit))


def test_jpeg_sof_height_zero_refused_before_decoding(tmp_path):
    """Run in a child with a 3 GB address-space limit: before the fix this allocated without bound."""
    p = tmp_path / "sof0.dcm"
    p.write_bytes(_sof0_dicom())
    assert len(p.read_bytes()) < 1024
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from cxr_edge.decode import decode, DecodeError
        try:
            decode({str(p)!r})
            print("DECODED")
        except DecodeError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "sof0.dcm: compressed pixel data refused before decoding" in r.stdout, r.stdout + r.stderr
    assert "height 0" in r.stdout


@pytest.mark.parametrize("case", ["jpeg-huge", "jpeg-mismatch", "jpegls-huge", "j2k-huge", "j2k-mismatch",
                                  "rle-segments", "rle-offsets", "not-a-stream"])
def test_compressed_stream_header_checked(case):
    if case.startswith("jpeg-"):
        stream = H.pillow_jpeg(G8)
        ds = H.encapsulated_dicom(H.patch_sof(stream, 30000, 30000) if case == "jpeg-huge"
                                  else H.patch_sof(stream, 24, 41), 24, 40, JPEGBaseline8Bit)
        want = "30000x30000 pixels, over the decompression-bomb limit" if case == "jpeg-huge" else "41x24 pixels but the header"
    elif case.startswith("jpegls"):
        ds = H.dicom_dataset(G8)
        try:
            ds.compress(JPEGLSLossless)
        except Exception as e:
            pytest.skip(f"no JPEG-LS encoder ({e})")
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        ds = H.encapsulated_dicom(H.patch_sof(frame, 20000, 20000, marker=b"\xff\xf7"), 24, 40, JPEGLSLossless)
        want = "jpeg-ls stream declares 20000x20000 pixels"
    elif case.startswith("j2k"):
        ds = H.dicom_dataset(np.tile(G12, (3, 2))[:64, :64].copy(), bits_stored=12)   # openjpeg needs >= 32 px
        try:
            ds.compress(JPEG2000Lossless)
        except Exception as e:
            pytest.skip(f"no JPEG 2000 encoder ({e})")
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        w, h = (40000, 40000) if case == "j2k-huge" else (64, 65)
        ds = H.encapsulated_dicom(H.patch_siz(frame, w, h), 64, 64, JPEG2000Lossless, bits=12)
        want = f"jpeg2000 stream declares {w}x{h} pixels"
    elif case.startswith("rle"):
        ds = H.dicom_dataset(G8)
        ds.compress(RLELossless)
        frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
        if case == "rle-segments":
            frame[0:4] = struct.pack("<I", 3)
            want = "RLE header declares 3 segments, the DICOM header implies 1"
        else:
            frame[4:8] = struct.pack("<I", 10 ** 9)
            want = "RLE segment offsets"
        ds = H.encapsulated_dicom(bytes(frame), 24, 40, RLELossless)
    else:
        ds = H.encapsulated_dicom(b"\x00" * 100, 24, 40, JPEGBaseline8Bit)
        want = "does not start like any compressed format"
    _refused(H.dicom_bytes(ds), "<bytes>:", want)


def test_deflate_bomb_refused():
    ds = H.dicom_dataset(np.zeros((16, 16), np.uint8))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds.ImageComments = "x" * 100            # body to deflate
    good = H.dicom_bytes(ds)
    assert np.array_equal(decode(good).pixels, np.zeros((16, 16), np.float32))
    # same header, deflated body that expands past the limit (zeros compress ~1000:1)
    meta_end = 132 + 12 + struct.unpack_from("<I", good, 132 + 8)[0]    # after (0002,0000) group length
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zero = bytes(1 << 24)
    comp.compress(zero), comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(zero) + comp.flush(zlib.Z_FULL_FLUSH)   # byte-aligned, history reset: repeatable
    body = block * ((MAX_PIXELS * 8 >> 24) + 8) + comp.flush()     # ~600 MB of zeros in < 1 MB
    _refused(good[:meta_end] + body, "decompression bomb")


def test_png_interlace_method_2_is_a_decode_error():
    b = io.BytesIO()
    Image.fromarray(G8).save(b, "PNG")
    data = bytearray(b.getvalue())
    data[28] = 2                                           # IHDR interlace method: only 0 and 1 exist
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    _refused(bytes(data), "<bytes>: corrupt or truncated image")


def test_unknown_vr_is_a_decode_error():
    good = H.dicom_bytes(H.dicom_dataset(G8))
    i = good.find(b"\x28\x00\x10\x00US")                     # Rows (0028,0010) US
    bad = good[:i + 4] + b"ZZ" + good[i + 6:]
    _refused(bad, "<bytes>:", "Unknown Value Representation 'ZZ'")


def test_corpus_regressions():
    """Minimised crashers the fuzz target found (tests/fuzz_decode.py): each must now end in
    DecodeError or a valid image, in a child process with a 3 GB address-space limit."""
    files = sorted(CORPUS.glob("*.bin"))
    if not files:
        pytest.skip("no corpus yet")
    code = textwrap.dedent("""
        import resource, sys
        import numpy as np
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        from cxr_edge.decode import decode, DecodeError
        for p in sys.argv[1:]:
            try:
                d = decode(open(p, "rb").read())
                ok = d.pixels.ndim == 2 and d.pixels.dtype == np.float32 and np.isfinite(d.pixels).all()
                print("OK" if ok else "BAD", p)
            except DecodeError as e:
                print("REFUSED" if str(e).startswith("<bytes>: ") else "BADMSG", p)
    """)
    r = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, timeout=300)
    lines = r.stdout.split("\n")[:-1]
    assert len(lines) == len(files) and all(x.split()[0] in ("OK", "REFUSED") for x in lines), r.stdout + r.stderr
    must_refuse = [x for x in lines if Path(x.split()[1]).name.startswith("refuse-")]
    assert must_refuse and all(x.startswith("REFUSED") for x in must_refuse), r.stdout


# == memory in flight, time limit ===============================================================
def test_estimate_from_header_only(tmp_path):
    def png_header(w, h):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IEND", b""))
    p = tmp_path / "big.png"
    p.write_bytes(png_header(7000, 6000))
    assert estimate_bytes(p) == 7000 * 6000 * BYTES_PER_PIXEL
    ds = H.dicom_dataset(G8)
    ds.Rows, ds.Columns = 3000, 2000
    assert estimate_bytes(H.dicom_bytes(ds)) == 3000 * 2000 * BYTES_PER_PIXEL
    assert estimate_bytes(b"garbage") > 0


def test_decode_pool_budget_in_bytes_and_timeout():
    from cxr_edge.inflight import DecodePool
    pool = DecodePool(workers=4, budget=100, timeout=0.5)
    running, peak, lock = [0], [0], threading.Lock()

    def work(x):
        with lock:
            running[0] += x
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= x
        return x

    tasks = [pool.submit(work, c, c) for c in (40, 40, 40, 150, 30, 30, 30, 30)]
    assert [pool.wait(t) for t in tasks] == [40, 40, 40, 150, 30, 30, 30, 30]
    assert pool.budget.peak <= 150 and peak[0] <= 150          # 150 > budget: ran alone
    hang = threading.Event()
    t1 = pool.submit(lambda _: hang.wait(60), None, 10)          # a decoder that never returns
    t2 = pool.submit(work, 5, 5)
    with pytest.raises(TimeoutError, match="longer than 0.5 s"):
        pool.wait(t1)
    assert pool.wait(t2) == 5 and pool.abandoned == 1             # the run goes on
    hang.set()
    pool.close()


def test_classifier_batch_size_bounded(default_package):
    import cxr_edge
    with pytest.raises(ValueError, match=r"batch_size must be 1\.\.1024"):
        cxr_edge.load(default_package, batch_size=100000)


def test_cli_batch_size_bounded():
    r = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "classify", "--batch-size", "100000", "x.png"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "must be 1..1024" in r.stderr and "Traceback" not in r.stderr


# == Kind D: NaN / infinity, one rule on every path =============================================
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_refused_on_every_path(tmp_path, bad):
    f = (G8 / 255.0).astype(np.float32)
    f[3, 4] = bad
    p = tmp_path / "float.tif"
    Image.fromarray(f, mode="F").save(p)
    for item in (p, p.read_bytes(), f, f.astype(np.float64), Image.fromarray(f, mode="F")):
        _refused(item, "NaN or infinity")


def test_finite_float_tiff_still_decodes(tmp_path):
    f = (G8 / 255.0).astype(np.float32) * 3 + 1              # any finite range: min..max
    p = tmp_path / "float.tif"
    Image.fromarray(f, mode="F").save(p)
    np.testing.assert_allclose(decode(p).pixels, (f - f.min()) / (f.max() - f.min()), atol=1e-6)


# == warnings reach the result, naming the input ===================================================
def test_library_warnings_collected_not_printed(tmp_path):
    ds = H.encapsulated_dicom(H.jpeg_lossless(G12, 12), 24, 40, JPEGLosslessSV1, bits=12)
    ds.BitsStored, ds.HighBit = 10, 9                       # the stream says 12
    p = tmp_path / "IM7"
    p.write_bytes(H.dicom_bytes(ds))
    code = textwrap.dedent(f"""
        from cxr_edge.decode import decode
        for _ in range(2):      # the second time too: no once-per-location suppression
            d = decode({str(p)!r})
            print(d.meta["warnings"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = r.stdout.splitlines()
    assert len(out) == 2 and out[0] == out[1] and "BitsStored 10 but the jpeg stream's own precision is 12" in out[0]
    assert str(p) in out[0]
    assert "Warning" not in r.stderr, r.stderr                # nothing bare on stderr


def test_warnings_column_in_sinks():
    from cxr_edge.postprocess import Result
    from cxr_edge.sinks import columns, row
    cols = columns(["a", "b"])
    assert cols.index("precision") < cols.index("warnings") < cols.index("error")
    r = Result("x.dcm", label="a", probabilities={"a": 0.7, "b": 0.3}, warnings=["x.dcm: one", "x.dcm: two"])
    assert row(r, ["a", "b"])["warnings"] == "x.dcm: one | x.dcm: two"
    assert row(Result("y.png", label="a", probabilities={"a": 1.0, "b": 0.0}), ["a", "b"])["warnings"] is None


def test_warnings_reach_classifier_results(default_package, tmp_path):
    import cxr_edge
    p = tmp_path / "IM000001"
    p.write_bytes(H.dicom_bytes(H.dicom_dataset(G8), preamble=False, implicit=True))
    with cxr_edge.load(default_package, backend="onnxruntime", precision="fp32") as clf:
        r = clf.predict([p])[0]
    assert r.ok, r.error
    assert r.warnings and all(w.startswith(str(p)) for w in r.warnings)


def test_hung_decoder_becomes_an_error_row(default_package):
    """A stand-in for a decoder that never returns (the fuzzer's hang kind): the row says so, the
    inputs after it are classified, and the run does not wait for the hung thread."""
    import cxr_edge
    from conftest import sample_images
    files = [str(p) for p in sample_images()[:2]]
    release = threading.Event()
    with cxr_edge.load(default_package, backend="onnxruntime", precision="fp32", batch_size=2,
                       decode_timeout=1.0) as clf:
        real = clf._prepare
        clf._prepare = lambda item: (release.wait(120), real(item))[1] if item == "HUNG" else real(item)
        rows = list(clf.stream([files[0], "HUNG", files[1]]))
    release.set()
    assert [r.status for r in rows] == ["ok", "error", "ok"]
    assert rows[1].error == "HUNG: decoding took longer than 1 s; decoder abandoned"


def test_hung_decoder_in_predict_one_becomes_an_error_result(default_package):
    """predict_one bounds decode time too: the hung input gives an error Result within the limit,
    and the next call is answered."""
    import cxr_edge
    from conftest import sample_images
    file = str(sample_images()[0])
    release = threading.Event()
    with cxr_edge.load(default_package, backend="onnxruntime", precision="fp32", decode_timeout=1.0) as clf:
        real = clf._prepare
        clf._prepare = lambda item, threads=1: (release.wait(120), real(item))[1] if item == "HUNG" \
            else real(item, threads)
        hung, ok = clf.predict_one("HUNG"), clf.predict_one(file)
    release.set()
    assert hung.status == "error" and hung.error == "HUNG: decoding took longer than 1 s; decoder abandoned"
    assert ok.status == "ok", ok.error


def test_cli_decode_limits_validated():
    for flag, value in (("--decode-memory", "0"), ("--decode-timeout", "-1"), ("--decode-memory", "lots")):
        r = subprocess.run([sys.executable, "-m", "cxr_edge.cli", "classify", flag, value, "x.png"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_plain_jpeg_with_height_zero_named(tmp_path):
    p = tmp_path / "dnl.jpg"
    p.write_bytes(H.patch_sof(H.pillow_jpeg(G8), height=0))
    _refused(p, "dnl.jpg: corrupt or truncated image (JPEG", "height 0")
