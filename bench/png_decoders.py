"""Is there a faster 16-bit PNG decoder than Pillow for the station path? Measured, not assumed.

    python -m cxr_edge.bench.png_decoders [--rounds 6]

Builds the full-size 16-bit PNGs of `--workload full-size` (fullsize.build, from the samples) and
times every decoder that is installed — Pillow (the runtime's), and if present OpenCV
(cv2.imdecode IMREAD_UNCHANGED), imagecodecs (libpng) and pyspng (libspng) — one image at a time and
on two threads (the classifier decodes on a thread pool), rounds interleaved, median reported.
Each decoder's pixels are compared with Pillow's; a decoder that differs is reported, not timed.
Also times Python's zlib inflating the same IDAT stream: the part of the work no PNG decoder
built on zlib avoids (zlib-ng or libdeflate inflate faster).
"""
from __future__ import annotations

import argparse
import io
import struct
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _decoders() -> dict:
    from PIL import Image
    found = {"pillow": lambda b: np.asarray(Image.open(io.BytesIO(b)))}
    try:
        import cv2
        cv2.setNumThreads(1)
        found["opencv"] = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED)
    except ImportError:
        pass
    try:
        import imagecodecs
        found["imagecodecs"] = imagecodecs.png_decode
    except ImportError:
        pass
    try:
        import pyspng
        found["pyspng"] = pyspng.load
    except ImportError:
        pass
    return found


def idat(data: bytes) -> bytes:
    """The concatenated IDAT payload (the zlib stream) of a PNG file."""
    pos, parts = 8, []
    while pos + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            parts.append(data[pos + 8:pos + 8 + n])
        pos += 12 + n
    return b"".join(parts)


def measure(files: list[bytes], rounds: int = 6) -> dict:
    """{decoder: {"serial_ms", "two_threads_ms"} per image, or {"differs": True}} plus "zlib_inflate_ms"."""
    decs = _decoders()
    ref = [decs["pillow"](b) for b in files]
    usable = {}
    res: dict = {}
    for name, fn in decs.items():
        same = all(np.array_equal(np.asarray(fn(b)), r) for b, r in zip(files, ref))   # shape and values
        if same:
            usable[name] = fn
        else:
            res[name] = {"differs": True}
    serial = {k: [] for k in usable}
    two = {k: [] for k in usable}
    streams = [idat(b) for b in files]
    inflate = []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(rounds):
            for k, fn in usable.items():
                t = time.perf_counter()
                for b in files:
                    fn(b)
                serial[k].append((time.perf_counter() - t) / len(files))
                t = time.perf_counter()
                list(pool.map(fn, files * 2))
                two[k].append((time.perf_counter() - t) / (2 * len(files)))
            t = time.perf_counter()
            for s in streams:
                zlib.decompress(s)
            inflate.append((time.perf_counter() - t) / len(files))
    for k in usable:
        res[k] = {"serial_ms": 1e3 * float(np.median(serial[k])), "two_threads_ms": 1e3 * float(np.median(two[k]))}
    res["zlib_inflate_ms"] = 1e3 * float(np.median(inflate))
    return res


def main(argv=None) -> int:
    from . import fullsize
    from .core import default_data
    ap = argparse.ArgumentParser(prog="python -m cxr_edge.bench.png_decoders", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxr-png-") as d:
        sources = sorted(p for p in default_data().rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        built = fullsize.build(sources, Path(d), n=2)
        files = [Path(p).read_bytes() for p in built["png16"]]
    res = measure(files, a.rounds)
    print(f"16-bit PNG, {len(files)} files of {np.mean([len(b) for b in files]) / 1e6:.1f} MB; ms per image (median of {a.rounds} rounds)")
    print("| decoder | one at a time | two threads |\n|---|---|---|")
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"| {k} | " + ("pixels differ from Pillow |  |" if v.get("differs")
                                 else f"{v['serial_ms']:.1f} | {v['two_threads_ms']:.1f} |"))
    print(f"| zlib inflate of the IDAT stream alone | {res['zlib_inflate_ms']:.1f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
