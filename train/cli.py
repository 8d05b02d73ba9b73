"""`cxr-edge train EXPERIMENT --data DIR --out RUN [overrides]`.

Multi-GPU (or multi-process on CPU, gloo): `torchrun --standalone --nproc_per_node N --no-python
cxr-edge train EXPERIMENT ...`; the experiment's batch_size stays the global batch."""
from __future__ import annotations

import hashlib
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("train", help="run a training experiment (train/experiments/*.json or a path)")
    p.add_argument("experiment", nargs="?", help="experiment name or JSON file; omit with --list")
    p.add_argument("--list", action="store_true", help="list the experiment files")
    p.add_argument("--data", help="dataset directory (manifest.csv, class folders, Kermany or Radiography layout)")
    p.add_argument("--layout", choices=["auto", "manifest", "folders", "kermany", "radiography", "cohen"],
                   help="dataset layout (default: the experiment's, usually auto-detected; folders = "
                        "DATA/<class>/*.png)")
    p.add_argument("--out", help="run directory (checkpoints, log.csv, report.md, plots)")
    p.add_argument("--epochs", type=int, help="override every phase's epochs")
    p.add_argument("--image-size", type=int, help="override the input size (reduced CPU runs)")
    p.add_argument("--limit", type=int, help="use at most N training images (val/test N/4)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--in-channels", type=int, choices=[1, 3],
                   help="1: one gray input channel (first conv built for 1 channel); 3: pseudo-RGB")
    p.add_argument("--init", choices=["random", "imagenet", "checkpoint"],
                   help="override the experiment's initialisation (e.g. random where no ImageNet weights exist)")
    p.add_argument("--init-path", help="local weights file for init imagenet (torchvision/timm .pth or "
                                       ".safetensors) or checkpoint (a run's best.safetensors); nothing is downloaded")
    p.add_argument("--deadline", help="wall-clock limit (ISO-8601, UTC unless a zone is given, e.g. 2026-11-29T09:40): "
                                      "stop after the last epoch that ends before it, keeping the best checkpoint")
    p.add_argument("--samples-per-epoch", type=int, help="train on a random subset of N images per epoch "
                                                           "(shorter epochs, more checkpoints on a slow CPU)")
    p.add_argument("--cpu-bf16", choices=["auto", "on", "off"],
                   help="bf16 autocast when training on the CPU; auto (default): only where the CPU has native "
                        "bf16 (AVX512-BF16/AMX), since emulated bf16 is slower than fp32")
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
            init = cfg.get("model", {}).get("init", "random")
            print(f"{name:34s} {cfg['model']['name']:13s} init {init:10s} {cfg.get('paper', '')[:70]}")
        return 0
    if not args.data or not args.out:
        raise SystemExit("cxr-edge train: --data and --out are required")
    cfg = load_experiment(args.experiment)
    cfg = apply_overrides(cfg, args.epochs, args.image_size, args.limit, args.batch_size, args.seed,
                          in_channels=args.in_channels, init=args.init, init_path=args.init_path)
    if getattr(args, "deadline", None):
        cfg["deadline"] = args.deadline
    if getattr(args, "cpu_bf16", None):
        cfg["cpu_bf16"] = {"auto": "auto", "on": True, "off": False}[args.cpu_bf16]
    if getattr(args, "samples_per_epoch", None):
        cfg["samples_per_epoch"] = int(args.samples_per_epoch)
    if args.layout:
        cfg.setdefault("data", {})["layout"] = args.layout
    try:
        rep = run_experiment(cfg, args.data, args.out, device=args.device, resume=not args.no_resume,
                             force_test_sha256=_hold_out_hashes(args.hold_out))
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rep:
        print((Path(args.out) / "report.md").read_text())
    return 0
