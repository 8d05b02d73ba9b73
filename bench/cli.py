"""`cxr-edge bench`: registered by cxr_edge.cli through `add_parser`."""
from __future__ import annotations

import json
import sys


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark every backend/precision of a model package (speed, memory, parity)",
                       description="Measure each available backend x precision of a model package: artifact size, load "
                                   "time, inference-only throughput and latency per batch size, end-to-end throughput "
                                   "on real files, single-image latency, peak RSS, and parity with the torch fp32 "
                                   "reference. Writes DIR/report.json, report.md and throughput.png.")
    p.add_argument("--model", help="model package directory (default: the embedded default model)")
    p.add_argument("--data", help="images to run on: a dataset directory (manifest.csv, class folders, ...) or a "
                                  "folder of images (default: the repository's samples/)")
    p.add_argument("--limit", type=int, help="use at most N images of --data (a deterministic spread)")
    p.add_argument("--backends", nargs="+", metavar="NAME", choices=["tensorrt", "openvino", "onnxruntime", "torch"],
                   help="only these backends (the torch fp32 reference always runs)")
    p.add_argument("--precisions", nargs="+", metavar="P", choices=["fp32", "fp16", "bf16", "int8"],
                   help="only these run precisions")
    p.add_argument("--batch-sizes", nargs="+", type=int, metavar="N",
                   help="inference-only batch sizes (default 1 8 32; --quick: 1 8)")
    p.add_argument("--e2e-batch-size", type=int, default=8, help="Classifier batch size for end-to-end runs (default 8, "
                                                                 "as classify)")
    p.add_argument("--e2e-images", type=int, help="images per end-to-end run (cycling the data)")
    p.add_argument("--quick", action="store_true", help="a minute or two: fewer repeats, batch sizes 1 and 8")
    p.add_argument("--repeats", type=int, help="timed iterations per measurement (overrides the time budget)")
    p.add_argument("--threads", type=int, help="inference threads passed to every backend (default: each backend's own)")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="also stream N images through Classifier.stream and record RSS (memory slope)")
    p.add_argument("--soak-every", type=int, default=200, metavar="K", help="RSS sample every K images (default 200)")
    p.add_argument("--no-reference", action="store_true", help="skip the torchvision reference pipeline")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of one subprocess per combination (RSS becomes a delta)")
    p.add_argument("--try-unavailable", action="store_true",
                   help="attempt combinations this machine reports as unavailable (their errors are recorded)")
    p.add_argument("--timeout", type=float, help="seconds per combination before it is recorded as failed")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    p.add_argument("--json", action="store_true", help="print the report JSON instead of the markdown table")
    p.add_argument("--workload", choices=["standard", "full-size"], default="standard",
                   help="standard: every backend x precision on --data; full-size: the X-ray station's inputs "
                        "(2048 x 2500 12-bit MONOCHROME1 DICOM with rescale + window, 16-bit PNG, 2 MP JPEG, built "
                        "from --data or samples/) with the auto backend, next to the naive pydicom/torchvision/torch "
                        "pipeline, each in its own process")
    p.add_argument("--repetitions", type=int, default=3,
                   help="full-size: alternating (ours, naive) repetitions; the headline is their median (default 3)")
    p.add_argument("--images", type=int, default=4, help="full-size: pictures per input kind (default 4)")
    p.add_argument("--compare", metavar="BASELINE.json",
                   help="compare this run with a stored report.json; exit 2 when a throughput drops beyond "
                        "--tolerance plus the measured run-to-run spread, a parity gate fails, or labels change; "
                        "prints a markdown diff table (for a CI job summary)")
    p.add_argument("--current", metavar="REPORT.json",
                   help="with --compare: compare this stored report instead of running the benchmark")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="allowed relative throughput drop before the measured spread is added (default 0.10)")
    p.set_defaults(func=cmd_bench)
    return p


def _compare(args, report) -> int:
    from .compare import compare_files
    try:
        ok, md = compare_files(args.compare, report, args.tolerance)
    except ValueError as e:
        print(f"cxr-edge bench --compare: {e}", file=sys.stderr)
        return 2
    print(md)
    return 0 if ok else 2


def cmd_bench(args) -> int:
    from .core import BenchOptions, run_bench
    log = lambda m: print(m, file=sys.stderr, flush=True)
    if args.current:
        if not args.compare:
            print("cxr-edge bench: --current needs --compare BASELINE.json", file=sys.stderr)
            return 2
        try:
            current = json.loads(open(args.current).read())
        except (OSError, json.JSONDecodeError) as e:
            print(f"cxr-edge bench: {args.current}: cannot read the report ({e})", file=sys.stderr)
            return 2
        return _compare(args, current)
    if args.workload == "full-size":
        from .station import markdown as fs_markdown, run_fullsize
        if args.repetitions < 1:
            print("cxr-edge bench: --repetitions must be >= 1", file=sys.stderr)
            return 2
        report = run_fullsize(model=args.model, data=args.data, out=args.out, repetitions=args.repetitions,
                              images=args.images, e2e_images=args.e2e_images or 24, batch_size=args.e2e_batch_size,
                              threads=args.threads, naive=not args.no_reference, log=log)
        print(json.dumps(report, indent=2, default=float) if args.json else fs_markdown(report))
        bad = [r[m] for r in report["repetitions"] for m in r if r[m].get("status") != "ok"]
        if args.compare:
            return _compare(args, report) or (1 if bad else 0)
        return 1 if bad else 0
    opts = BenchOptions(backends=args.backends, precisions=args.precisions, batch_sizes=args.batch_sizes,
                        quick=args.quick, limit=args.limit, threads=args.threads, repeats=args.repeats,
                        isolate=not args.in_process, soak=args.soak, soak_every=args.soak_every,
                        reference=not args.no_reference, try_unavailable=args.try_unavailable,
                        e2e_batch_size=args.e2e_batch_size, e2e_images=args.e2e_images, timeout=args.timeout)
    report = run_bench(model=args.model, data=args.data, options=opts, out=args.out, log=log)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        from .report import markdown
        print(markdown(report))
    ref = next((r for r in report["records"] if r["reference"]), None)
    # exit 1 when a combination that should have run crashed (CI sees it); unavailable is not a failure
    crashed = [r for r in report["records"] if r["status"] == "error" and not r["forced"]]
    if args.compare:
        rc = _compare(args, report)
        if rc:
            return rc
    return 1 if crashed or (ref and ref["status"] == "error") else 0
