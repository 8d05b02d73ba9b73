"""`cxr-edge` command line: classify, info, explain, and the workbench's train / export / bench.

Exit status: 0 every input classified; 1 some inputs failed (their rows say why); 2 usage or
model errors. Expected failures print one line, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}


class UsageError(Exception):
    pass


def expand_inputs(inputs, recursive: bool) -> list[str]:
    """Files named explicitly are always kept (a missing one becomes an error row); folders
    contribute image-like files (known suffix, or none: DICOM files often have no extension)."""
    out = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(p.rglob("*") if recursive else p.iterdir())
            out += [str(f) for f in files if f.is_file() and not f.name.startswith(".")
                    and (f.suffix.lower() in IMAGE_SUFFIXES or f.suffix == "")]
        else:
            out.append(str(p))
    return out


def cmd_classify(args) -> int:
    import cxr_edge
    from .sinks import SINKS, Progress
    files = expand_inputs(args.inputs, args.recursive)
    if not files:
        raise UsageError("no input images found in " + ", ".join(args.inputs))
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        # before loading the model: a typo in the output path should not cost a model load first
        raise UsageError(f"--output {args.output}: output folder {Path(args.output).parent} does not exist")
    import warnings
    from PIL import Image
    # decode refuses images over its pixel limit with an error row; Pillow's own warning for them
    # would only add noise on stderr
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    clf = cxr_edge.load(args.model, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                        threads=args.threads)
    print(f"cxr-edge: {clf.why.split(' | ')[0]}", file=sys.stderr)
    print(f"cxr-edge: {cxr_edge.DISCLAIMER}", file=sys.stderr)
    suffix = Path(args.output).suffix.lower() if args.output else ""
    fmt = args.format or ("csv" if suffix == ".csv" else "jsonl" if suffix == ".jsonl" else
                          "table" if not args.output and sys.stdout.isatty() else "csv")
    # utf-8 whatever the locale: paths with non-ASCII names must not fail the run mid-way
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    sink = SINKS[fmt](out, clf.classes)
    progress = Progress(len(files))
    explain = bool(args.cam)
    failed = 0
    try:
        for r in clf.stream(files, explain=explain):
            sink.write(r)
            progress.update(r.ok)
            failed += 0 if r.ok else 1
            if explain and r.ok:
                from .explain import save_overlay
                save_overlay(r, Path(args.cam))
    except KeyboardInterrupt:
        progress.close()
        print(f"cxr-edge: interrupted after {progress.n} of {len(files)} inputs; rows written so far are kept",
              file=sys.stderr)
        return 130
    finally:
        sink.close()
        if out is not sys.stdout:
            out.close()
    progress.close()
    print(f"cxr-edge: {progress.n - failed} classified, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_info(args) -> int:
    from .backends import backend_status, candidates
    from .package import ModelPackage
    pkg = ModelPackage.read(args.model)
    status = backend_status()
    found, skipped = candidates(pkg, "auto", "auto")
    info = {
        "model": {"path": str(pkg.root), "name": pkg.name, "classes": pkg.classes, "preprocess": pkg.preprocess.to_dict(),
                  "artifacts": [{"file": a.file, "precision": a.precision, "bytes": a.bytes,
                                 "gates": {k: v.get("passed") for k, v in a.gate.items()}} for a in pkg.artifacts]},
        "backends": {n: {"available": ok, "reason": why,
                         "usable": [c.precision for c in found if c.backend == n],
                         "skipped": [x for x in skipped if x.split(":")[0].split()[0] == n]}
                     for n, (ok, why) in status.items()},
        "auto": {"backend": found[0].backend, "precision": found[0].precision, "artifact": found[0].artifact.file,
                 "reason": found[0].reason} if found else None,
        "ranked": [f"{c.backend}/{c.precision}" for c in found],
        "skipped": skipped,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model    {pkg.name}  ({pkg.root})")
    print(f"classes  {', '.join(pkg.classes)}")
    sp = pkg.preprocess
    print(f"input    {sp.channels}x{sp.size}x{sp.size}, resize {sp.resize}, mean {list(sp.mean)}, std {list(sp.std)}")
    for a in pkg.artifacts:
        gates = ", ".join(f"{k} {'not measured' if 'skipped' in v else 'pass' if v.get('passed') else 'FAIL'}"
                          for k, v in a.gate.items()) or "no gate record"
        print(f"artifact {a.file:18s} {a.precision:5s} {a.bytes / 1e6:6.1f} MB  {gates}")
    print("backends:")
    for n, (ok, why) in status.items():
        print(f"  {n:12s} {'yes' if ok else 'no ':3s}  {why}")
    if found:
        print(f"auto     {found[0].backend} {found[0].precision}: {found[0].reason}")
        print(f"ranked   {' > '.join(f'{c.backend}/{c.precision}' for c in found)}")
    else:
        print("auto     nothing usable")
    for s in skipped:
        print(f"skipped  {s}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxr-edge", description="Chest X-ray classification at the edge. Not for diagnostic use.")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("classify", help="classify images (files or folders)")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--model", help="model package directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", choices=["auto", "tensorrt", "openvino", "onnxruntime", "torch"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16", "int8"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, help="inference threads (default: the backend's choice)")
    p.add_argument("--recursive", "-r", action="store_true")
    p.add_argument("--output", "-o", help="write results here (.csv or .jsonl) instead of stdout")
    p.add_argument("--format", choices=["csv", "jsonl", "table"])
    p.add_argument("--cam", metavar="DIR", help="also write class-activation overlays (PNG) into DIR")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("info", help="backends available here, and what auto would choose")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for mod in ("explain", "train", "export", "bench"):
        _add_optional(sub, mod)
    return ap


def _add_optional(sub, mod):
    """Workbench commands register themselves; without torch they still show up and say why."""
    try:
        if mod == "explain":
            from .explain import add_parser
        elif mod == "train":
            from .train.cli import add_parser
        elif mod == "export":
            from .export.cli import add_parser
        else:
            from .bench.cli import add_parser
        add_parser(sub)
    except ImportError as e:
        p = sub.add_parser(mod, help=f"(unavailable: {e})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, e=e, m=mod: _unavailable(m, e))


def _unavailable(mod, e):
    raise UsageError(f"'cxr-edge {mod}' needs the workbench install (pip install 'cxr-edge[workbench]'): {e}")


def main(argv=None) -> int:
    try:
        ap = build_parser()
        args = ap.parse_args(argv)
    except KeyboardInterrupt:
        print("cxr-edge: interrupted", file=sys.stderr)
        return 130
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="cxr-edge: %(message)s")
    from .backends.base import BackendError
    from .package import PackageError
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # outside the classify loop (loading, shutting down): no traceback
        print("cxr-edge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # before OSError: `cxr-edge classify ... | head` is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (UsageError, PackageError, BackendError, OSError, ValueError) as e:
        print(f"cxr-edge: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"cxr-edge: error: a dependency is missing ({e}); "
              "the workbench commands need pip install 'cxr-edge[workbench]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
