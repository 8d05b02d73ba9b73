"""ctest: the C SDK's on-device verification (cxr_verify, CXR_FLAG_VERIFY) against cxr_edge.verify.

Builds a copy of the test package with a 128-image reference set (tests/test_verify.py
with_reference_set: the 16 samples x 8 variants, torch fp32 probabilities), then checks that
  - cxr_verify measures n, agreement, lower bound, max and p99 |dp| as the Python verifier does;
  - the verdict is cached in <cache_dir>/native-verdicts and reused (from_cache), and an unreadable
    cache file is measured again;
  - a package without a reference set gives CXR_E_UNAVAILABLE;
  - CXR_FLAG_VERIFY is accepted by cxr_open.

usage: check_verify.py LIBCXR_EDGE VECTORS_DIR SCRATCH_DIR
"""
from __future__ import annotations

import ctypes
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

CXR_FLAG_VERIFY = 0x4
CXR_E_UNAVAILABLE = 3
CXR_PROP_VERIFICATION = 8


class Options(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("backend", ctypes.c_char_p), ("precision", ctypes.c_char_p),
                ("device", ctypes.c_char_p), ("num_threads", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("cache_dir", ctypes.c_char_p)]


class Result(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_uint32), ("n", ctypes.c_uint32), ("agreement", ctypes.c_double),
                ("lower_bound", ctypes.c_double), ("max_abs_dp", ctypes.c_double), ("p99_abs_dp", ctypes.c_double),
                ("passed", ctypes.c_int32), ("from_cache", ctypes.c_int32)]


def main(lib_path: str, vectors: str, scratch_dir: str) -> int:
    from test_verify import with_reference_set

    from cxr_edge.backends import decide
    from cxr_edge.package import ModelPackage
    lib = ctypes.CDLL(lib_path)
    lib.cxr_last_error.restype = ctypes.c_char_p
    src = Path(json.loads((Path(vectors) / "vectors.json").read_text())["package"])
    scratch = Path(scratch_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    pkg_dir = with_reference_set(src, scratch / "ref.cxrpkg") if not (src / "reference.u16").exists() else src
    cache = scratch / "cache"

    def open_model(path, flags=CXR_FLAG_VERIFY):
        o = Options()
        lib.cxr_options_init(ctypes.byref(o))
        o.backend, o.precision, o.flags, o.cache_dir = b"openvino", b"fp32", flags, str(cache).encode()
        m = ctypes.c_void_p()
        st = lib.cxr_open(str(path).encode(), ctypes.byref(o), ctypes.byref(m))
        assert st == 0, (st, lib.cxr_last_error())
        return m

    def verify(m, use_cache=1):
        r = Result()
        lib.cxr_verify_result_init(ctypes.byref(r))
        st = lib.cxr_verify(m, use_cache, ctypes.byref(r))
        return st, r

    m = open_model(pkg_dir)
    st, r = verify(m)
    assert st == 0, lib.cxr_last_error()
    d = decide(ModelPackage.read(pkg_dir), "openvino", "fp32", measure=True, force_parity=True)
    py = d.ranked[0].evidence.stats
    d.close()
    assert r.n == py.n and r.passed == 1 and not r.from_cache, (r.n, py.n, r.passed)
    for name in ("agreement", "lower_bound", "max_abs_dp", "p99_abs_dp"):
        assert abs(getattr(r, name) - getattr(py, name)) <= 1e-5, (name, getattr(r, name), getattr(py, name))
    files = list((cache / "native-verdicts").glob("*.txt"))
    assert len(files) == 1, files
    st, r2 = verify(m)
    assert st == 0 and r2.from_cache == 1 and r2.n == r.n
    files[0].write_text("garbage")
    st, r3 = verify(m)
    assert st == 0 and r3.from_cache == 0 and r3.passed == 1
    v = ctypes.c_char_p()
    assert lib.cxr_get_property(m, CXR_PROP_VERIFICATION, ctypes.byref(v)) == 0 and b"passed" in v.value, v.value
    lib.cxr_close(m)

    bare = scratch / "bare.cxrpkg"
    shutil.copytree(pkg_dir, bare)
    meta = json.loads((bare / "model.json").read_text())
    meta.pop("reference_set", None)
    (bare / "reference.u16").unlink()
    (bare / "model.json").write_text(json.dumps(meta))
    m = open_model(bare, 0)
    st, _ = verify(m)
    assert st == CXR_E_UNAVAILABLE and b"no reference set" in lib.cxr_last_error(), (st, lib.cxr_last_error())
    lib.cxr_close(m)
    print(f"cxr_verify: n {r.n}, agreement {r.agreement:.4f}, lower bound {r.lower_bound:.4f}, "
          f"max |dp| {r.max_abs_dp:.2e} (Python {py.max_abs_dp:.2e}); cache reuse and re-measure ok")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
