"""Decode: every accepted input form, made from the real sample X-rays in temporary folders.

No model is needed here: these tests compare decoded pixels with what the file holds."""
from __future__ import annotations

import csv
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr_edge.decode import MAX_PIXELS, Decoded, DecodeError, decode, from_array

from conftest import CXR, SAMPLES, sample_images

SAMPLE = SAMPLES / "NORMAL2-IM-1427-0001.jpeg"        # 1776 x 1416, grayscale JPEG


@pytest.fixture(scope="module")
def gray8() -> np.ndarray:
    """A real radiograph, 8-bit, at a size that keeps the tests quick (aspect ratio kept)."""
    with Image.open(SAMPLE) as im:
        im = im.convert("L").resize((444, 354), Image.BILINEAR)
        return np.asarray(im).copy()


def _expected(g8: np.ndarray) -> np.ndarray:
    return g8.astype(np.float32) / np.float32(255.0)


def _check(d: Decoded, shape=None):
    assert isinstance(d, Decoded)
    assert d.pixels.dtype == np.float32 and d.pixels.ndim == 2 and d.pixels.flags.c_contiguous
    assert 0.0 <= float(d.pixels.min()) and float(d.pixels.max()) <= 1.0
    if shape is not None:
        assert d.pixels.shape == shape


# -- Pillow formats -------------------------------------------------------------------------------
def test_jpeg_sample_matches_pillow():
    for p in sample_images()[:3]:
        d = decode(p)
        with Image.open(p) as im:
            ref = np.asarray(im.convert("L"))
        _check(d, ref.shape)
        assert d.original_size == (ref.shape[1], ref.shape[0])
        assert np.array_equal(d.pixels, _expected(ref))
        assert d.meta["format"] == "JPEG"


def test_png_8bit(tmp_path, gray8):
    p = tmp_path / "g8.png"
    Image.fromarray(gray8).save(p)
    d = decode(p)
    _check(d, gray8.shape)
    assert np.array_equal(d.pixels, _expected(gray8))


def test_png_16bit_full_scale(tmp_path, gray8):
    p = tmp_path / "g16.png"
    g16 = gray8.astype(np.uint16) * 257                   # 0..255 -> 0..65535, exactly
    Image.fromarray(g16).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")                    # really a 16-bit file
    d = decode(p)
    _check(d, gray8.shape)
    assert d.meta.get("bits") == 16
    np.testing.assert_allclose(d.pixels, _expected(gray8), atol=1e-6)


def test_palette_png(tmp_path, gray8):
    # palette reversed (index i shows gray 255 - i): decode must look the colours up, not use indices
    idx = (255 - gray8).astype(np.uint8)
    im = Image.fromarray(idx, mode="L").convert("P")
    im.putpalette([v for i in range(256) for v in (255 - i,) * 3])
    p = tmp_path / "pal.png"
    im.save(p)
    with Image.open(p) as chk:
        assert chk.mode == "P"
    d = decode(p)
    _check(d, gray8.shape)
    np.testing.assert_allclose(d.pixels, _expected(gray8), atol=1e-6)


def test_rgba_png_alpha_ignored(tmp_path, gray8):
    alpha = np.linspace(0, 255, gray8.shape[1], dtype=np.uint8)[None, :].repeat(gray8.shape[0], 0)
    rgba = np.dstack([gray8, gray8, gray8, alpha])
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(p)
    d = decode(p)
    _check(d, gray8.shape)
    np.testing.assert_allclose(d.pixels, _expected(gray8), atol=1e-6)
    la = tmp_path / "la.png"                          # grayscale + alpha
    Image.fromarray(np.dstack([gray8, alpha]), mode="LA").save(la)
    assert np.array_equal(decode(la).pixels, _expected(gray8))


def test_rgb_jpeg_is_luma(tmp_path, gray8):
    # colour-tinted copy: decode gives ITU-R 601 luma, as Pillow's convert("L") (to rounding)
    rgb = np.dstack([gray8, (gray8 * 0.8).astype(np.uint8), (gray8 * 0.6).astype(np.uint8)])
    p = tmp_path / "rgb.png"
    Image.fromarray(rgb, mode="RGB").save(p)
    d = decode(p)
    with Image.open(p) as im:
        ref = np.asarray(im.convert("L")).astype(np.float32) / 255
    np.testing.assert_allclose(d.pixels, ref, atol=0.5 / 255 + 1e-6)


def test_cmyk_jpeg(tmp_path, gray8):
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(gray8).convert("CMYK").save(p, quality=95)
    with Image.open(p) as chk:
        assert chk.mode == "CMYK"
    d = decode(p)
    _check(d, gray8.shape)
    assert float(np.abs(d.pixels - _expected(gray8)).mean()) < 0.02


def test_tiff_and_bmp(tmp_path, gray8):
    for name in ("g.tif", "g.bmp"):
        p = tmp_path / name
        Image.fromarray(gray8).save(p)
        d = decode(p)
        _check(d, gray8.shape)
        assert np.array_equal(d.pixels, _expected(gray8)), name
    p = tmp_path / "g16.tif"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(p)
    np.testing.assert_allclose(decode(p).pixels, _expected(gray8), atol=1e-6)


def test_multipage_tiff_refused(tmp_path, gray8):
    p = tmp_path / "two.tif"
    a = Image.fromarray(gray8)
    a.save(p, save_all=True, append_images=[a.copy()])
    with pytest.raises(DecodeError, match=r"two\.tif: multi-page TIFF \(2 frames\)"):
        decode(p)


def test_real_shared_png_modes():
    """Real PNGs from the shared set in each stored mode (L, RGB, RGBA) decode to 2-D 0..1."""
    if not (CXR / "manifest.csv").is_file():
        pytest.skip(f"real chest X-rays not found at {CXR} (../shared/data/cxr beside the checkout)")
    seen = {}
    with open(CXR / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            key = (r["format"], r["mode"])
            if key not in seen:
                seen[key] = r
    assert {("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "RGB")} <= set(seen)
    for (fmt, mode), r in sorted(seen.items()):
        d = decode(CXR / r["path"])
        _check(d, (int(r["height"]), int(r["width"])))
        with Image.open(CXR / r["path"]) as im:
            ref = np.asarray(im.convert("RGB")).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
        np.testing.assert_allclose(d.pixels, ref, atol=1e-5, err_msg=f"{fmt} {mode}")


# -- in-memory inputs -----------------------------------------------------------------------------
def test_bytes_input_equals_file():
    data = SAMPLE.read_bytes()
    a, b = decode(data), decode(SAMPLE)
    assert np.array_equal(a.pixels, b.pixels) and a.original_size == b.original_size
    assert a.source == "<bytes>"
    assert np.array_equal(decode(bytearray(data)).pixels, b.pixels)
    assert np.array_equal(decode(memoryview(data)).pixels, b.pixels)
    with pytest.raises(DecodeError, match="empty input"):
        decode(b"")


def test_pil_input_left_untouched(gray8):
    with Image.open(SAMPLE) as im:
        im.load()
        before = (im.mode, im.size)
        d = decode(im)
        assert (im.mode, im.size) == before            # the caller's image is not converted or drafted
    assert np.array_equal(d.pixels, decode(SAMPLE).pixels)
    rgb = Image.fromarray(np.dstack([gray8] * 3), mode="RGB")
    np.testing.assert_allclose(decode(rgb).pixels, _expected(gray8), atol=1e-6)


def test_numpy_uint8_and_rgb(gray8):
    d = decode(gray8)
    _check(d, gray8.shape)
    assert np.array_equal(d.pixels, _expected(gray8))
    assert d.original_size == (gray8.shape[1], gray8.shape[0])
    np.testing.assert_allclose(decode(np.dstack([gray8] * 3)).pixels, _expected(gray8), atol=1e-6)


def test_numpy_uint16_needs_bits_stored(gray8):
    g12 = gray8.astype(np.uint16) * 16                 # a 12-bit detector's range, 0..4080
    with pytest.raises(DecodeError, match="bits_stored"):
        decode(g12)
    d = decode(g12, bits_stored=12)
    np.testing.assert_allclose(d.pixels, g12 / 4095.0, atol=1e-6)
    d16 = decode(gray8.astype(np.uint16) * 257, bits_stored=16)
    np.testing.assert_allclose(d16.pixels, _expected(gray8), atol=1e-6)
    with pytest.raises(DecodeError, match="bits_stored must be 1..16"):
        decode(g12, bits_stored=17)


def test_numpy_float(gray8):
    f = gray8.astype(np.float64) / 255
    d = decode(f)
    assert d.pixels.dtype == np.float32
    np.testing.assert_allclose(d.pixels, f, atol=1e-7)
    with pytest.raises(DecodeError, match=r"float pixels must lie in 0\.\.1"):
        decode(f * 255)
    with pytest.raises(DecodeError, match=r"float pixels must lie in 0\.\.1"):
        decode(f - 0.5)
    bad = f.copy()
    bad[3, 3] = np.nan
    with pytest.raises(DecodeError, match="NaN"):
        decode(bad)
    with pytest.raises(DecodeError, match="unsupported dtype"):
        from_array(gray8.astype(np.int32))
    with pytest.raises(DecodeError, match="expected H x W"):
        decode(np.zeros((2, 3, 4, 5), np.uint8))
    with pytest.raises(DecodeError, match="unsupported input type"):
        decode(12345)


# -- EXIF orientation, draft mode ---------------------------------------------------------------------
def test_exif_orientation_honoured(tmp_path, gray8):
    im = Image.fromarray(gray8)
    plain, turned = tmp_path / "plain.jpg", tmp_path / "turned.jpg"
    im.save(plain, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90 CW to display"
    im.save(turned, quality=95, exif=exif.tobytes())  # same entropy-coded data, plus an APP1 block
    a, b = decode(plain), decode(turned)
    h, w = gray8.shape
    assert a.pixels.shape == (h, w) and b.pixels.shape == (w, h)
    assert np.array_equal(b.pixels, np.rot90(a.pixels, k=-1))
    assert b.original_size == (h, w)                   # as displayed: (width, height) swapped
    exif[0x0112] = 3                                  # 180 degrees
    im.save(turned, quality=95, exif=exif.tobytes())
    assert np.array_equal(decode(turned).pixels, np.rot90(a.pixels, k=2))


def test_jpeg_draft_mode_shrinks_big_files(tmp_path):
    with Image.open(SAMPLE) as im:
        big = im.convert("L").resize((2400, 1900), Image.BILINEAR)
    p = tmp_path / "big.jpg"
    big.save(p, quality=92)
    full = decode(p)
    small = decode(p, min_side=224)
    assert full.pixels.shape == (1900, 2400)
    # DCT-domain 1/2, 1/4 or 1/8: the largest reduction keeping both sides >= 224 is 1/8 (300 x 237)
    assert small.pixels.shape == (238, 300) or small.pixels.shape == (237, 300)
    assert min(small.pixels.shape) >= 224
    assert small.original_size == full.original_size == (2400, 1900)
    # the downscale is of the same picture: compare with the full decode box-averaged by 8
    h, w = (s // 8 * 8 for s in full.pixels.shape)
    box = full.pixels[:h, :w].reshape(h // 8, 8, w // 8, 8).mean((1, 3))
    hh, ww = min(box.shape[0], small.pixels.shape[0]), min(box.shape[1], small.pixels.shape[1])
    assert float(np.abs(box[:hh, :ww] - small.pixels[:hh, :ww]).mean()) < 0.01
    # no draft when the file is not much larger than needed, nor for non-JPEG files
    assert decode(p, min_side=2000).pixels.shape == (1900, 2400)
    png = tmp_path / "big.png"
    big.save(png)
    assert decode(png, min_side=224).pixels.shape == (1900, 2400)


# -- refused inputs -----------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height, one tiny IDAT, IEND."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [9000, 50000])   # over our limit (Pillow warns), over 2x (Pillow errors)
def test_decompression_bomb_refused(tmp_path, side):
    assert side * side > MAX_PIXELS
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(side, side))
    for item in (p, p.read_bytes()):
        with pytest.raises(DecodeError, match=f"decompression-bomb limit of {MAX_PIXELS:,}") as e:
            decode(item)
        assert f"{side}x{side} pixels" in str(e.value) or f"{side * side:,} pixels" in str(e.value)


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        decode(empty)
    trunc = tmp_path / "trunc.jpeg"
    trunc.write_bytes(SAMPLE.read_bytes()[:20000])
    with pytest.raises(DecodeError, match=r"trunc\.jpeg: corrupt or truncated image"):
        decode(trunc)
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not a picture\n" * 20)
    with pytest.raises(DecodeError, match=r"notes\.png: not a recognised image file"):
        decode(text)
    with pytest.raises(DecodeError, match=r"nothere\.png: file not found"):
        decode(tmp_path / "nothere.png")
    with pytest.raises(DecodeError, match="is a directory"):
        decode(tmp_path)
