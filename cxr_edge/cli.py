"""`cxr-edge` command line: the only module above every stage (inputs, decode, preprocess, backends,
postprocess, sinks) and the only runtime module that dispatches to the workbench (train / export /
bench), which it imports lazily so that an edge install runs without torch.

Exit status: 0 every input classified; 1 some inputs failed (their rows say why); 2 usage or
model errors; 130 interrupted. Expected failures print one line, never a traceback."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .inputs import expand_inputs

EXIT_CODES = """exit status:
  0    every input classified
  1    some inputs failed (their rows say why); the others were classified
  2    usage, model package or backend error (one line on stderr, no rows)
  130  interrupted (Ctrl-C); rows written so far are kept"""

class UsageError(Exception):
    """A command line that cannot be carried out (printed as one line, exit status 2)."""


def cmd_classify(args) -> int:
    """`cxr-edge classify`: one row per input to stdout or --output; returns the exit status."""
    import cxr_edge
    from .overlay import OverlayWriter
    from .progress import Progress
    from .sinks import SINKS
    files = expand_inputs(args.inputs, args.recursive)
    if not files:
        raise UsageError("no input images found in " + ", ".join(args.inputs))
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        # before loading the model: a typo in the output path should not cost a model load first
        raise UsageError(f"--output {args.output}: output folder {Path(args.output).parent} does not exist")
    from .sinks import done_paths, format_for, path_text
    try:    # the format follows --output's extension unless --format says; an unknown one is an error
        fmt = format_for(args.output, args.format)
    except ValueError as e:
        raise UsageError(str(e)) from None
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other: pick one")
    if resume and (not args.output or fmt not in ("csv", "jsonl")):
        raise UsageError("--resume needs --output FILE in csv or jsonl (the file to continue)")
    exists = bool(args.output) and os.path.lexists(args.output)
    if exists and not (resume or overwrite):
        raise UsageError(f"--output {args.output} already exists: pass --overwrite to replace it, "
                         "or --resume to add the inputs it does not have yet")
    import warnings
    from PIL import Image
    # decode refuses images over its pixel limit with an error row; Pillow's own warning for them
    # would only add noise on stderr
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if args.dicom_sr:   # before loading the model: a missing highdicom should not cost a model load first
        try:
            from .dicom_sr import SrWriter, note_on_result
        except ImportError as e:
            raise UsageError(f"--dicom-sr needs pip install 'cxr-edge[dicom-node]' ({e})") from None
    from .guard import OperatingPointError
    try:
        clf = cxr_edge.load(args.model, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                            threads=args.threads, operating_point=getattr(args, "operating_point", None),
                            **_decode_limits(args))
    except OperatingPointError as e:
        raise UsageError(f"--operating-point: {e}") from None
    print(f"cxr-edge: {clf.why.split(' | ')[0]}", file=sys.stderr)
    print(f"cxr-edge: {cxr_edge.DISCLAIMER}", file=sys.stderr)
    fmt = fmt or ("table" if not args.output and sys.stdout.isatty() else "csv")
    header = True
    if resume and exists:   # skip the inputs whose path is already in the file, append the rest
        try:
            done = done_paths(args.output, fmt, clf.classes)
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None
        before = len(files)
        files = [f for f in files if path_text(f) not in done]
        header = os.path.getsize(args.output) == 0
        print(f"cxr-edge: --resume: {before - len(files)} of {before} inputs already in {args.output}, "
              f"{len(files)} to classify", file=sys.stderr)
        if not files:
            return 0
    # utf-8 whatever the locale: paths with non-ASCII names must not fail the run mid-way
    out = open(args.output, "a" if resume else "w", newline="", encoding="utf-8") if args.output else sys.stdout
    progress = Progress(len(files))
    # rows to a terminal go through the progress bar's writer so the bar keeps its own line
    sink = SINKS[fmt](progress.wrap(out), clf.classes, **({} if fmt == "table" else {"header": header}))
    explain = bool(args.cam)
    overlays = OverlayWriter(Path(args.cam)) if explain else None
    srs = SrWriter(args.dicom_sr, clf) if args.dicom_sr else None
    failed = 0
    try:
        for r in clf.stream(files, explain=explain):
            if srs is not None:   # before the row: a "no SR" note goes into the row's warnings
                note_on_result(r, srs.write(r)[1])
            sink.write(r)
            progress.update(r.ok)
            failed += 0 if r.ok else 1
            if overlays is not None and r.ok:
                overlays.write(r)
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
    if srs is not None:
        print(f"cxr-edge: {srs.summary()}", file=sys.stderr)
    print(f"cxr-edge: {progress.n - failed} classified, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def cmd_info(args) -> int:
    """`cxr-edge info`: the package, every backend and auto's choice (text or --json)."""
    from .backends import backend_status, decide
    from .package import ModelPackage
    pkg = ModelPackage.read(args.model)
    status = backend_status()
    d = decide(pkg, "auto", "auto")          # measures what is not yet known here, like load() does
    d.close()
    found, skipped = d.ranked, d.skipped
    info = {
        "model": {"path": str(pkg.root), "name": pkg.name, "classes": pkg.classes, "preprocess": pkg.preprocess.to_dict(),
                  "artifacts": [{"file": a.file, "precision": a.precision, "bytes": a.bytes,
                                 "gates": {k: v.get("passed") for k, v in a.gate.items()}} for a in pkg.artifacts]},
        "backends": {n: {"available": ok, "reason": why,
                         "usable": [c.precision for c in found if c.backend == n],
                         "skipped": [x for x in skipped if x.split(":")[0].split()[0] == n]}
                     for n, (ok, why) in status.items()},
        "auto": {"backend": found[0].backend, "precision": found[0].precision, "artifact": found[0].artifact.file,
                 "reason": found[0].reason, "why_chosen": d.reason} if found else None,
        "ranked": [f"{c.backend}/{c.precision}" for c in found],
        "evidence": [c.evidence.record() for c in found],
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
        from .verify import format_evidence
        print(f"auto     {found[0].backend} {found[0].precision}: {d.reason}")
        print(f"ranked   {' > '.join(f'{c.backend}/{c.precision}' for c in found)}")
        print("evidence:")
        print("\n".join("  " + line for line in format_evidence([c.evidence for c in found]).splitlines()))
    else:
        print("auto     nothing usable")
    for s in skipped:
        print(f"skipped  {s}")
    return 0


def cmd_explain(args) -> int:
    """`cxr-edge explain`: one class-activation overlay PNG per input."""
    import cxr_edge
    from .overlay import OverlayWriter
    files = expand_inputs(args.inputs, args.recursive)
    if not files:
        raise UsageError("no input images found in " + ", ".join(args.inputs))
    clf = cxr_edge.load(args.model, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                        threads=args.threads, **_decode_limits(args))
    print(f"cxr-edge: {clf.why.split(' | ')[0]}", file=sys.stderr)
    print(f"cxr-edge: {cxr_edge.DISCLAIMER}", file=sys.stderr)
    overlays = OverlayWriter(Path(args.out), alpha=args.alpha)
    failed = 0
    for r in clf.stream(files, explain=args.cls or True):
        if not r.ok:
            failed += 1
            print(f"{r.source}\terror\t{r.error}")
            continue
        path = overlays.write(r)
        print(f"{r.source}\t{r.label}\t{r.probability:.4f}\t{r.cam_method}\t{path}")
    print(f"cxr-edge: {len(files) - failed} overlays written to {args.out}, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


BACKENDS = ["auto", "tensorrt", "openvino", "onnxruntime", "torch"]
PRECISIONS = ["auto", "fp32", "fp16", "bf16", "int8"]


def _batch_size(text: str) -> int:
    from .inflight import MAX_BATCH_SIZE
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= n <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_BATCH_SIZE}, got {n} (memory grows with the batch)")
    return n


def _positive(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    return parse


def _decode_limits(args) -> dict:
    mb = getattr(args, "decode_memory", None)
    return {"decode_budget": int(mb * (1 << 20)) if mb else None, "decode_timeout": getattr(args, "decode_timeout", None)}


def _add_model_options(p, batch: bool = True):
    p.add_argument("--model", metavar="PKG", help="model package directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="inference backend; auto: the fastest one whose parity is verified here (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="run precision; auto: the backend's fastest verified one (default: %(default)s)")
    if batch:
        p.add_argument("--batch-size", type=_batch_size, default=8, metavar="N",
                       help="images per inference batch, 1..1024 (default: %(default)s)")
        p.add_argument("--decode-memory", type=_positive(float), metavar="MB",
                       help="memory for images being decoded at once, in MiB; inputs whose header-estimated "
                            "working set does not fit wait (default: 1024, or $CXR_EDGE_DECODE_MEMORY_MB)")
        p.add_argument("--decode-timeout", type=_positive(float), metavar="S",
                       help="seconds one input may spend decoding before it becomes an error row (default: 60)")
    p.add_argument("--threads", type=int, metavar="N", help="inference threads (default: the backend's own choice)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command (workbench commands register themselves when installed)."""
    from . import __version__
    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="cxr-edge", formatter_class=fmt, epilog=EXIT_CODES,
                                 description="Chest X-ray classification at the edge. Not for diagnostic use.")
    ap.add_argument("--version", action="version", version=f"cxr-edge {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the runtime decides (backend choice, skips)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", help="classify images (files or folders)", formatter_class=fmt, epilog=EXIT_CODES,
                       description="Classify chest X-rays (JPEG, PNG 8/16-bit, TIFF, BMP, DICOM) and write one row per "
                                   "input: label, per-class probabilities, backend, precision, or the error that names "
                                   "the input and the cause. Rows are written as they complete.")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders")
    _add_model_options(p)
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--output", "-o", metavar="FILE", help="write results to FILE (.csv or .jsonl) instead of stdout")
    p.add_argument("--format", choices=["csv", "jsonl", "table"],
                   help="row format (default: from --output's extension, .csv or .jsonl/.ndjson, any other "
                        "extension is an error; without --output a table on a terminal, else csv)")
    p.add_argument("--overwrite", action="store_true", help="replace --output FILE if it exists (default: refuse)")
    p.add_argument("--resume", action="store_true",
                   help="append to --output FILE, skipping inputs whose path is already in it (an interrupted "
                        "run continues where it stopped; the same model must have written it)")
    p.add_argument("--cam", metavar="DIR", help="also write class-activation overlays (PNG) into DIR")
    p.add_argument("--operating-point", metavar="NAME",
                   help="label by a threshold stored in model.json instead of argmax, e.g. 'sensitive': normal only "
                        "when the calibrated p(normal) reaches the threshold chosen for disease sensitivity")
    p.add_argument("--dicom-sr", metavar="DIR", help="also write a DICOM SR (TID 1500) per DICOM input into DIR, as "
                   "SR_<SOPInstanceUID>.dcm (needs cxr-edge[dicom-node])")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("info", help="backends available here, and what auto would choose",
                       description="Show the model package, every backend (available or why not) and the evidence "
                                   "behind auto's choice.")
    p.add_argument("--model", metavar="PKG", help="model package directory (default: the embedded default model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("explain", help="class activation map overlays (PNG) for images", formatter_class=fmt,
                       epilog=EXIT_CODES, description="Write <name>.cam.png: the class activation map of the predicted "
                                                      "(or a named) class blended over the radiograph.")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders")
    _add_model_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="write <name>.cam.png overlays here")
    p.add_argument("--class", dest="cls", metavar="NAME", help="explain this class instead of the predicted one")
    p.add_argument("--alpha", type=float, default=0.6, help="heatmap opacity where the map is 1 (default: %(default)s)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.set_defaults(func=cmd_explain)

    from .dicom_node import add_parser as _add_dicom_node   # stdlib-only import; pynetdicom loads when it runs
    _add_dicom_node(sub)

    from .verify import add_parser as _add_verify   # `cxr-edge verify` (issue 12)
    _add_verify(sub)

    for mod in ("train", "export", "bench"):
        _add_optional(sub, mod)
    return ap


def _add_optional(sub, mod):
    """Workbench commands register themselves; without torch they still show up and say why."""
    try:
        if mod == "train":
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


# which extra brings a missing top-level module (the hint names the right one, not always the workbench)
_EXTRA_OF = {"torch": "workbench", "torchvision": "workbench", "nncf": "workbench", "safetensors": "workbench",
             "sklearn": "workbench", "matplotlib": "workbench", "openvino": "openvino", "onnxruntime": "onnxruntime",
             "onnx": "openvino", "pydicom": "dicom", "highdicom": "dicom-node", "pynetdicom": "dicom-node",
             "tensorrt": "tensorrt", "cuda": "tensorrt"}


def _install_hint(e: ImportError) -> str:
    top = (getattr(e, "name", None) or "").split(".")[0]
    extra = _EXTRA_OF.get(top)
    return f"; pip install 'cxr-edge[{extra}]'" if extra else "; the installation is incomplete (reinstall cxr-edge)"


def main(argv=None) -> int:
    """Entry point of `cxr-edge`: parse `argv` (default sys.argv), run the command, return the exit status."""
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
        print(f"cxr-edge: error: a dependency is missing ({e}){_install_hint(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
