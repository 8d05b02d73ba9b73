#!/usr/bin/env python3
"""Test vectors for the native SDK, produced by the Python runtime (the reference).

For every test image this writes the raw pixel buffer the C API receives (uint8 or uint16, with
row padding on some), the tensor `cxr_edge.preprocess.preprocess` makes from the same pixels for
several preprocessing specs, and the probabilities `cxr_edge.load(pkg, backend="openvino")` gives
at each requested precision. ctest compares the C++ results with these.

The model package: --model PKG, else the embedded default package when it exists, else a package
with a randomly initialised DenseNet121 built here (cached under --package-cache), so that the
native tests never depend on a trained model being present.

Everything written lands under --out (a build directory): the vectors are derived from images
that must not be committed, and they are cheap to regenerate.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SHARED_CXR = REPO.parent / "shared" / "data" / "cxr" / "images"
TEST_PACKAGE_SIZE = 160

# Preprocessing specs the C++ resampler is checked against, besides the package's own: both resize
# policies, 1 and 3 channels, integer and fractional source boxes, down- and up-scaling.
EXTRA_SPECS = {
    "stretch224_imagenet": dict(size=224, resize="stretch", channels=3,
                                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "crop256_224": dict(size=224, resize="shorter_side_crop", resize_size=256, channels=3,
                        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "crop250_199_gray": dict(size=199, resize="shorter_side_crop", resize_size=250, channels=1,
                             mean=(0.5,), std=(0.3,)),
    "stretch320_up": dict(size=320, resize="stretch", channels=1, mean=(0.0,), std=(1.0,)),
    # preprocessing v2: Pillow's reducing_gap (integer box pre-reduction, then the bilinear resample)
    "stretch128_gap2": dict(size=128, resize="stretch", channels=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                            reducing_gap=2.0),
    "crop250_199_gap15_gray": dict(size=199, resize="shorter_side_crop", resize_size=250, channels=1,
                                    mean=(0.5,), std=(0.3,), reducing_gap=1.5),
    "stretch40_gap3": dict(size=40, resize="stretch", channels=1, mean=(0.0,), std=(1.0,), reducing_gap=3.0),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the vectors (emptied first)")
    ap.add_argument("--model", type=Path, help="model package directory (default: the embedded default "
                                               "package, else a random-weights test package)")
    ap.add_argument("--package-cache", type=Path,
                    help="where the random test package is built and kept (default: OUT/../native-test-package)")
    ap.add_argument("--precision", nargs="+", default=["fp32"],
                    help="OpenVINO run precisions to record probabilities for (default: fp32)")
    ap.add_argument("--shared-images", type=int, default=6,
                    help="at most this many images from ../shared/data/cxr when present (default 6)")
    return ap.parse_args(argv)


# -- model package ------------------------------------------------------------------------------
def resolve_package(args) -> Path:
    from cxr_edge.package import DEFAULT_PACKAGE, MODEL_JSON
    if args.model is not None:
        return args.model.resolve()
    if (DEFAULT_PACKAGE / MODEL_JSON).is_file():
        return DEFAULT_PACKAGE
    cache = (args.package_cache or args.out.parent / "native-test-package").resolve()
    return ensure_test_package(cache)


def _package_ok(root: Path) -> bool:
    from cxr_edge.package import ModelPackage, PackageError
    try:
        pkg = ModelPackage.read(root)
    except PackageError:
        return False
    return pkg.provenance.get("purpose") == "native-sdk-test"


def ensure_test_package(root: Path) -> Path:
    """A DenseNet121 with fixed random weights, exported like cxr_edge.export would."""
    if _package_ok(root):
        return root
    import torch
    from cxr_edge.package import Artifact, ModelPackage
    from cxr_edge.preprocess import PreprocessSpec, preprocess
    from cxr_edge.decode import decode
    from cxr_edge.architectures import WithFeatures, build

    print(f"building the random-weights test package in {root} (once)", flush=True)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    size = TEST_PACKAGE_SIZE
    spec = PreprocessSpec(size=size, resize="stretch", channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    arch = {"name": "densenet121", "head": "linear", "num_classes": 3, "in_channels": 3,
            "dropout": 0.0, "input_size": size}
    torch.manual_seed(0)
    net = build(arch)
    # A freshly initialised net has meaningless BatchNorm statistics and nearly saturated softmax
    # outputs, which would make a probability-parity test pass trivially. Calibrate BN on real
    # radiographs and scale the head so the probabilities spread over (0, 1).
    images = sample_paths()
    if not images:
        raise SystemExit(f"no sample radiographs under {REPO / 'samples'} to calibrate the test package on")
    calib = torch.from_numpy(np.stack([preprocess(decode(p, min_side=size).pixels, spec) for p in images]))
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the calibration batch's own statistics
    with torch.no_grad():
        net.train()(calib)
        net.eval()
        logits = net(calib)
        lin = net.head[-1]
        scale = 1.5 / float(logits.std(0).mean().clamp_min(1e-6))
        lin.weight.mul_(scale)
        lin.bias.copy_(lin.bias * scale - (logits * scale).mean(0))
    path = root / "model.onnx"
    torch.onnx.export(WithFeatures(net).eval(), (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits", "features"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
                      opset_version=18, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    ModelPackage(root=root, name="native-sdk-test", classes=["covid", "normal", "pneumonia"], normal_class="normal",
                 preprocess=spec, architecture=arch, cam={"features_output": "features", "kind": "gap_linear"},
                 provenance={"purpose": "native-sdk-test", "weights": "random (torch.manual_seed(0)), "
                             "BatchNorm calibrated on samples/: not a diagnostic model"},
                 artifacts=[Artifact(file="model.onnx", format="onnx", precision="fp32",
                                     outputs=["logits", "features"], gate={"openvino/fp32": {"passed": True}})]).write()
    return root


# -- test images ----------------------------------------------------------------------------------
def sample_paths() -> list[Path]:
    """The repository's own sample radiographs (JPEG/PNG anywhere under samples/)."""
    return sorted(p for p in (REPO / "samples").rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))


def source_images(n_shared: int) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 H x W) of real radiographs, in a fixed order."""
    paths = sample_paths()
    if SHARED_CXR.is_dir() and n_shared > 0:
        # one or two from each source: different detectors, sizes and aspect ratios
        per_source = [sorted(d.iterdir()) for d in sorted(SHARED_CXR.iterdir()) if d.is_dir()]
        picked = []
        for k in range(2):
            picked += [files[k] for files in per_source if len(files) > k]
        paths += picked[:n_shared]
    out = []
    for i, p in enumerate(paths):
        with Image.open(p) as im:  # the index keeps names unique where long stems share a prefix
            out.append((f"{i:02d}-{p.stem[:32]}", np.asarray(im.convert("L"), dtype=np.uint8).copy()))
    return out


def cases(images) -> list[dict]:
    """The buffers the C API is fed: uint8 as stored, 12- and 16-bit variants, MONOCHROME1 variants,
    padded row strides, and small synthetic images for the resampler's edge cases."""
    rng = np.random.default_rng(8)
    out = []
    for i, (name, u8) in enumerate(images):
        out.append(dict(name=f"{name}-u8", pixels=u8, bits=8, mono1=False, pad=(i % 3) * 5))
        if i % 4 == 1:
            # synthetic 12-bit detector: rescaled, dithered in the low bits, a few values past
            # 2^12-1 (which the Python decoder clips to white)
            v = (u8.astype(np.uint32) * 4095 + 127) // 255 + rng.integers(0, 16, u8.shape)
            v = np.minimum(v, 4095).astype(np.uint16)
            v[:3, :7] = 4096 + 500
            out.append(dict(name=f"{name}-u12", pixels=v, bits=12, mono1=False, pad=2 * (i % 2) + 4))
        if i % 4 == 2:
            out.append(dict(name=f"{name}-u8-mono1", pixels=255 - u8, bits=8, mono1=True, pad=0))
        if i % 4 == 3:
            v = (4095 - (u8.astype(np.uint16) * 16 + rng.integers(0, 16, u8.shape))).astype(np.uint16)
            out.append(dict(name=f"{name}-u12-mono1", pixels=v, bits=12, mono1=True, pad=6))
        if i == 0:
            out.append(dict(name=f"{name}-u16", pixels=(u8.astype(np.uint16) * 257), bits=16, mono1=False, pad=0))
    # Resampler edge cases: the minimum 2x2, odd sizes, upscaling, an exact model-size image
    # (Pillow copies instead of resampling) and very elongated shapes.
    for name, (h, w) in {"tiny-2x2": (2, 2), "odd-3x5": (3, 5), "up-37x100": (37, 100),
                         "exact-160": (160, 160), "exact-224": (224, 224), "exact-256x300": (256, 300),
                         "tall-900x41": (900, 41), "wide-23x1201": (23, 1201)}.items():
        out.append(dict(name=name, pixels=rng.integers(0, 256, (h, w)).astype(np.uint8), bits=8, mono1=False,
                        pad=3))
    out.append(dict(name="synthetic-u10", pixels=rng.integers(0, 1100, (301, 257)).astype(np.uint16), bits=10,
                    mono1=False, pad=0))
    return out


def reference_gray(case) -> np.ndarray:
    """What the Python runtime decodes these pixels to (MONOCHROME1: inverted, as decode does)."""
    from cxr_edge.decode import from_array
    gray = from_array(case["pixels"], case["bits"] if case["pixels"].dtype == np.uint16 else None)
    if case["mono1"]:
        gray = (np.float32(1.0) - gray).astype(np.float32)
    return gray


def write_raw(path: Path, pixels: np.ndarray, pad: int) -> int:
    """Little-endian rows with `pad` extra bytes after each: returns the row stride in bytes."""
    h, w = pixels.shape
    row = pixels.astype(pixels.dtype.newbyteorder("<")).view(np.uint8).reshape(h, -1)
    buf = np.zeros((h, row.shape[1] + pad), np.uint8)
    buf[:, :row.shape[1]] = row
    buf[:, row.shape[1]:] = 0xA5  # padding must never be read as pixels: make it conspicuous
    path.write_bytes(buf.tobytes())
    return buf.shape[1]


def write_pgm(path: Path, pixels: np.ndarray, bits: int):
    """Binary PGM (P5): the sample program's input. 16-bit samples are big-endian by the format."""
    h, w = pixels.shape
    maxval = (1 << bits) - 1
    data = pixels.astype(">u2").tobytes() if pixels.dtype == np.uint16 else pixels.tobytes()
    path.write_bytes(f"P5\n{w} {h}\n{maxval}\n".encode() + data)


def python_probabilities(pkg, precision, grays):
    """(probabilities per image in class order, None) or (None, why the runtime cannot run it)."""
    import cxr_edge
    from cxr_edge.backends import BackendError
    try:
        clf = cxr_edge.load(pkg, backend="openvino", precision=precision)
    except BackendError as e:  # e.g. no int8 artifact in the package, or no bf16 on this CPU
        return None, str(e)
    with clf:
        results = clf.predict(list(grays))
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise SystemExit(f"Python runtime failed on a test image at {precision}: {bad[0]}")
    return [[r.probabilities[k] for k in pkg.classes] for r in results], None


def main(argv=None) -> int:
    args = parse_args(argv)
    from cxr_edge.package import ModelPackage
    from cxr_edge.preprocess import PreprocessSpec, preprocess

    pkg_dir = resolve_package(args)
    pkg = ModelPackage.read(pkg_dir)
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "raw").mkdir(parents=True)
    (out / "tensors").mkdir()
    (out / "pgm").mkdir()

    specs = {"package": pkg.preprocess}
    specs.update({k: PreprocessSpec(**v) for k, v in EXTRA_SPECS.items()})
    all_cases = cases(source_images(args.shared_images))
    grays = [reference_gray(c) for c in all_cases]

    manifest = {"package": str(pkg_dir), "classes": pkg.classes,
                "specs": {k: s.to_dict() for k, s in specs.items()}, "probabilities": {}, "cases": []}
    for c, gray in zip(all_cases, grays):
        h, w = c["pixels"].shape
        raw = f"raw/{c['name']}.raw"
        stride = write_raw(out / raw, c["pixels"], c["pad"])
        tensors = {}
        for key, spec in specs.items():
            t = preprocess(gray, spec)
            rel = f"tensors/{c['name']}.{key}.f32"
            t.astype("<f4").tofile(out / rel)
            tensors[key] = rel
        entry = dict(name=c["name"], raw=raw, type="u16" if c["pixels"].dtype == np.uint16 else "u8",
                     bits=c["bits"], width=w, height=h, stride=stride, monochrome1=c["mono1"], tensors=tensors)
        if not c["mono1"] and (c["name"].endswith("-u8") or c["name"].endswith("-u12")) and len(
                [e for e in manifest["cases"] if "pgm" in e]) < 4:
            entry["pgm"] = f"pgm/{c['name']}.pgm"
            write_pgm(out / entry["pgm"], c["pixels"], c["bits"])
        manifest["cases"].append(entry)

    # Probabilities from the Python runtime on the same decoded pixels: float32 0..1 arrays go
    # through decode (identity for them), preprocess, the OpenVINO backend and softmax.
    for prec in args.precision:
        probs, why = python_probabilities(pkg, prec, grays)
        if probs is None:
            print(f"no {prec} probabilities: {why}", file=sys.stderr)
            continue
        manifest["probabilities"][prec] = probs

    (out / "vectors.json").write_text(json.dumps(manifest, indent=1) + "\n")
    n_prob = {k: len(v) for k, v in manifest["probabilities"].items()}
    print(f"wrote {len(all_cases)} cases x {len(specs)} specs to {out} (package {pkg_dir}, probabilities {n_prob})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
