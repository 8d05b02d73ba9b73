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
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    from .core import run_bench
    log = lambda m: print(m, file=sys.stderr, flush=True)
    report = run_bench(model=args.model, data=args.data, backends=args.backends, precisions=args.precisions,
                       batch_sizes=args.batch_sizes, quick=args.quick, out=args.out, limit=args.limit,
                       threads=args.threads, repeats=args.repeats, isolate=not args.in_process, soak=args.soak,
                       soak_every=args.soak_every, reference=not args.no_reference,
                       try_unavailable=args.try_unavailable, e2e_batch_size=args.e2e_batch_size,
                       e2e_images=args.e2e_images, timeout=args.timeout, log=log)
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    else:
        from .report import markdown
        print(markdown(report))
    ref = next((r for r in report["records"] if r["reference"]), None)
    # exit 1 when a combination that should have run crashed (CI sees it); unavailable is not a failure
    crashed = [r for r in report["records"] if r["status"] == "error" and not r["forced"]]
    return 1 if crashed or (ref and ref["status"] == "error") else 0
