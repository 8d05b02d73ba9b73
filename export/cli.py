"""`cxr-edge export CHECKPOINT --out PKG ...`"""
from __future__ import annotations

import sys


def add_parser(sub):
    p = sub.add_parser("export", help="checkpoint -> model package (ONNX, INT8 Q/DQ, OpenVINO IR, TensorRT), parity-gated")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by cxr-edge train")
    p.add_argument("--out", required=True, help="package directory to write (replaced)")
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"], choices=["fp32", "fp16", "bf16", "int8"],
                   help="fp16/bf16 are run precisions of the fp32 artifact and are gated on it")
    p.add_argument("--val", required=True, help="labelled images for the parity gate: DIR or RUN/split.json[:part] (default part: test)")
    p.add_argument("--val-limit", type=int, help="use at most N labelled images")
    p.add_argument("--calib", help="calibration images for int8: DIR or RUN/split.json[:part] (default part: train)")
    p.add_argument("--calib-size", type=int, default=300)
    p.add_argument("--calib-by-source", action="store_true",
                   help="calibration images balanced by data source (manifest/split sources) instead of at random")
    p.add_argument("--max-drop", type=float,
                   help="accuracy-controlled int8 (NNCF): revert quantizers until the share of control images whose "
                        "top-1 equals torch fp32 with max |dp| <= --dp-tol drops by at most this (absolute)")
    p.add_argument("--dp-tol", type=float, default=0.05, help="|dp| tolerance inside the --max-drop metric")
    p.add_argument("--control", help="control images for --max-drop: DIR or RUN/split.json[:part] (default: the parity set)")
    p.add_argument("--int8-ignore", nargs="*", metavar="NODE",
                   help="keep these ONNX nodes in float; no names: the stem conv and the classifier")
    p.add_argument("--bias-correction", choices=["fast", "full"], default="fast",
                   help="NNCF bias correction after quantization (full: slower, layer by layer)")
    p.add_argument("--int8-preset", choices=["mixed", "performance"], default="mixed")
    p.add_argument("--reference", metavar="IMAGES",
                   help="images for the package's reference set (DIR or RUN/split.json[:part]); default: "
                        "--reference-k images of the parity set")
    p.add_argument("--reference-k", type=int, default=256, help="reference-set size taken from the parity set")
    p.add_argument("--reference-variants", action="store_true",
                   help="add 8 deterministic variants (crops, scale, gamma, contrast, rotation) of each --reference image")
    p.add_argument("--formats", nargs="+", default=["onnx"], choices=["onnx", "openvino", "tensorrt"])
    p.add_argument("--keep-failed", action="store_true", help="keep artifacts that fail their gate (marked failed)")
    p.add_argument("--no-features", action="store_true", help="omit the feature-map output (no CAM from this package)")
    p.add_argument("--name")
    p.add_argument("--card", metavar="RUN/report.json",
                   help="attach a model card built from this training report (and the split.json beside it)")
    p.add_argument("--card-command", default="", help="the training command to record in the card")
    p.set_defaults(func=run)


def export_settings(args):
    """The parsed `cxr-edge export` arguments as an export.settings.ExportSettings."""
    from .quantize import QuantSettings
    from .settings import ExportSettings, GateSettings, Int8Settings, ReferenceSettings
    quant = QuantSettings(preset=args.int8_preset, fast_bias_correction=args.bias_correction == "fast",
                          dp_tol=args.dp_tol, max_drop=args.max_drop)
    if args.int8_ignore is not None:
        # an empty list: the stem conv and the classifier, named once the ONNX file exists
        quant.ignored = list(args.int8_ignore) or ["<sensitive>"]
    return ExportSettings(
        precisions=args.precision, formats=args.formats, features=not args.no_features, name=args.name,
        gate=GateSettings(val=args.val, val_limit=args.val_limit, keep_failed=args.keep_failed),
        int8=Int8Settings(calib=args.calib, calib_size=args.calib_size, calib_by_source=args.calib_by_source,
                          quant=quant, control=args.control),
        reference=ReferenceSettings(images=args.reference, k=args.reference_k, variants=args.reference_variants))


def run(args) -> int:
    from .pipeline import GateFailed, export_checkpoint
    try:
        pkg = export_checkpoint(args.checkpoint, args.out, export_settings(args),
                                log=lambda m: print(m, file=sys.stderr))
    except GateFailed as e:
        print(f"cxr-edge export: {len(e.table.splitlines())} rows; gate FAILED - see the table above. "
              "Failed combinations are marked in model.json; auto never picks them.", file=sys.stderr)
        return 1
    if args.card:
        from pathlib import Path
        from .model_card import attach_card
        attach_card(pkg, args.card, Path(args.card).parent / "split.json", args.card_command)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
