"""`cxr-edge train EXPERIMENT --data DIR --out RUN [overrides]`."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("train", help="run a training experiment (train/experiments/*.json or a path)")
    p.add_argument("experiment", nargs="?", help="experiment name or JSON file; omit with --list")
    p.add_argument("--list", action="store_true", help="list the experiment files")
    p.add_argument("--data", help="dataset directory (manifest.csv, class folders, Kermany or Radiography layout)")
    p.add_argument("--out", help="run directory (checkpoints, log.csv, report.md, plots)")
    p.add_argument("--epochs", type=int, help="override every phase's epochs")
    p.add_argument("--image-size", type=int, help="override the input size (reduced CPU runs)")
    p.add_argument("--limit", type=int, help="use at most N training images (val/test N/4)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--init-path", help="local weights file for init imagenet/checkpoint")
    p.add_argument("--no-resume", action="store_true", help="start over even if RUN/last.pt exists")
    p.add_argument("--hold-out", nargs="*", default=[],
                   help="image files whose patients are forced into the test split (e.g. samples/)")
    p.set_defaults(func=run)


def _hold_out_hashes(paths) -> set:
    out = set()
    for p in paths:
        p = Path(p)
        for f in (sorted(p.rglob("*")) if p.is_dir() else [p]):
            if f.is_file():
                out.add(hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def run(args) -> int:
    from .experiment import apply_overrides, list_experiments, load_experiment, run_experiment
    if args.list or not args.experiment:
        for name in list_experiments():
            cfg = load_experiment(name)
            print(f"{name:34s} {cfg.get('paper', '')[:90]}")
        return 0
    if not args.data or not args.out:
        raise SystemExit("cxr-edge train: --data and --out are required")
    cfg = load_experiment(args.experiment)
    cfg = apply_overrides(cfg, args.epochs, args.image_size, args.limit, args.batch_size, args.seed)
    if args.init_path:
        cfg["model"]["init_path"] = args.init_path
    rep = run_experiment(cfg, args.data, args.out, device=args.device, resume=not args.no_resume,
                         force_test_sha256=_hold_out_hashes(args.hold_out))
    if rep:
        print((Path(args.out) / "report.md").read_text())
    return 0
