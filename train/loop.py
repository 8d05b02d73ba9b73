"""One training loop for every experiment: CPU or CUDA (AMP + channels_last), deterministic seeds,
best-val checkpoint, resumable, early stopping, per-epoch CSV log, DDP through torchrun (gloo on CPU).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cxr_edge.decode import decode
from cxr_edge.train.metrics import classification_report
from cxr_edge.preprocess import PreprocessSpec, normalise, resample

from .augment import Augment
from .checkpoint import load_checkpoint, save_checkpoint
from .data import Sample
from .losses import make_loss
from cxr_edge.architectures import CXRNet, build


# -- data -------------------------------------------------------------------------------------------
class CachedImages(torch.utils.data.Dataset):
    """Decodes and resamples each image once (through the runtime's own decode + resample), then
    serves augment -> normalise per epoch. Decoding full radiographs every epoch would cost more
    than the training step on a 2-core CPU."""

    def __init__(self, samples: list[Sample], classes: list, spec: PreprocessSpec, augment: Augment | None = None,
                 threads: int = 2):
        self.samples, self.spec, self.augment = samples, spec, augment
        self.index = {c: i for i, c in enumerate(classes)}
        self.labels = np.array([self.index[s.label] for s in samples], dtype=np.int64)
        with ThreadPoolExecutor(threads) as ex:
            self.cache = list(ex.map(self._load, samples))

    def _load(self, s: Sample) -> np.ndarray:
        img = decode(s.path, min_side=self.spec.decode_hint()).pixels
        if s.mask:
            m = decode(s.mask).pixels
            if m.shape != img.shape:
                from PIL import Image
                m = np.asarray(Image.fromarray(m, mode="F").resize(img.shape[::-1], Image.NEAREST))
            img = img * (m > 0.5)
        return resample(img, self.spec).astype(np.float16)  # half the memory; 11 bits >> 8-bit sources

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        x = self.cache[i].astype(np.float32)
        if self.augment is not None:
            x = self.augment(x)
        return torch.from_numpy(normalise(x, self.spec)), int(self.labels[i])


# -- trainable parameters ------------------------------------------------------------------------------
def backbone_layers(net: CXRNet) -> list[tuple[str, nn.Module]]:
    """The backbone's parameter-bearing leaf modules (conv, BN, linear), in definition order:
    the 'layers' that set_trainable counts."""
    return [(n, m) for n, m in net.backbone.named_modules()
            if not list(m.children()) and list(m.parameters(recurse=False))]


def set_trainable(net: CXRNet, rule) -> int:
    """rule: "all" | "head" (feature extraction) | {"from_layer": N} | {"last_fraction": f} |
    {"from_module": "body.denseblock2.denselayer7.conv2"}.

    Layers are the backbone's parameter-bearing leaf modules in definition order (see
    `backbone_layers`); layer N onwards train. Keras counts every layer (activations, pooling,
    concatenations too), so a Keras "from layer N" is best written as {"from_module": ...} naming
    the module Keras' layer N corresponds to. Frozen BatchNorm layers also stop updating
    statistics (eval mode), as in Keras. Returns the number of trainable parameters."""
    named = backbone_layers(net)
    leaves = [m for _, m in named]
    if rule == "all":
        start = 0
    elif rule == "head":
        start = len(leaves)
    elif isinstance(rule, dict) and "from_layer" in rule:
        start = int(rule["from_layer"])
    elif isinstance(rule, dict) and "last_fraction" in rule:
        start = int(round(len(leaves) * (1 - float(rule["last_fraction"]))))
    elif isinstance(rule, dict) and "from_module" in rule:
        prefix = str(rule["from_module"])
        start = next((i for i, (n, _) in enumerate(named) if n == prefix or n.startswith(prefix + ".")), None)
        if start is None:
            raise ValueError(f"from_module {prefix!r}: no such parameter-bearing module in the backbone "
                             f"(first few: {', '.join(n for n, _ in named[:4])})")
    else:
        raise ValueError(f"unknown trainable rule {rule!r}")
    for i, m in enumerate(leaves):
        for p in m.parameters(recurse=False):
            p.requires_grad = i >= start
    for p in net.head.parameters():
        p.requires_grad = True
    net._frozen_bn = [m for i, m in enumerate(leaves) if i < start and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def train_mode(net: CXRNet):
    net.train()
    for m in getattr(net, "_frozen_bn", []):
        m.eval()


def make_optimizer(cfg: dict, params, lr: float):
    name = cfg.get("name", "adam").lower()
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


def make_scheduler(cfg: dict, opt, epochs: int, steps_per_epoch: int):
    name = (cfg or {}).get("name", "none")
    if name == "none":
        return None
    if name == "cosine":
        total = max(1, epochs * steps_per_epoch)
        warm = int(cfg.get("warmup_epochs", 0) * steps_per_epoch)
        lam = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        return torch.optim.lr_scheduler.LambdaLR(opt, lam)
    if name == "multistep":  # milestones in epochs, stepped per batch for one code path
        ms = [int(m) * steps_per_epoch for m in cfg["milestones"]]
        return torch.optim.lr_scheduler.MultiStepLR(opt, ms, gamma=float(cfg.get("gamma", 0.1)))
    raise ValueError(f"unknown schedule {name!r}")


# -- distributed -------------------------------------------------------------------------------------
def dist_setup(device: str = "auto"):
    """(rank, world size). Under torchrun (RANK/WORLD_SIZE set, world > 1) joins the process group:
    NCCL when training on CUDA, gloo on CPU. Each process binds to GPU LOCAL_RANK."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedBatchSampler(torch.utils.data.Sampler):
    """DDP batches that add up to the single-process run's batches.

    The same seeded RandomSampler runs in every process (same generator state), is cut into
    global batches of `batch_size` exactly as DataLoader(shuffle=True) would, and each process
    takes its 1/world slice. So with world processes the union of one step's local batches is the
    single-process step's batch; with gradients averaged by DDP (equal local sizes, a mean loss)
    the update equals the single-process one, up to float summation order. Needs batch_size
    divisible by world; an incomplete last global batch is dropped as the single-process loader
    drops it."""

    def __init__(self, dataset, batch_size: int, rank: int, world: int, generator, drop_last: bool):
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} (the global batch) must be divisible by the "
                             f"{world} DDP processes")
        if len(dataset) < world:
            raise ValueError(f"{len(dataset)} training images cannot be shared by {world} processes")
        self.inner = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset, generator=generator),
                                                   batch_size, drop_last)
        self.rank, self.world = rank, world

    def __iter__(self):
        for b in self.inner:
            per = len(b) // self.world
            if per == 0:
                continue
            yield b[self.rank * per:(self.rank + 1) * per]

    def __len__(self):
        return len(self.inner)


def _reseed_worker(worker_id: int):
    """DataLoader workers get copies of the dataset: give each its own augmentation stream
    (torch derives a different initial seed per worker and per epoch from the loader generator)."""
    info = torch.utils.data.get_worker_info()
    aug = getattr(info.dataset, "augment", None)
    if aug is not None:
        aug.rng = np.random.default_rng(torch.initial_seed() % 2 ** 63)


# -- precision -----------------------------------------------------------------------------------------
def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why): whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), from
    /proc/cpuinfo flags (Linux) and torch's detected CPU capability. Without native bf16, autocast
    to bf16 on the CPU converts in software and is slower than fp32 (measured: docs/REPRODUCTION.md)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "unknown"
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    return native, (f"native bf16 ({', '.join(sorted({'avx512_bf16', 'amx_bf16'} & flags))}), torch capability {cap}"
                    if native else f"no avx512_bf16/amx_bf16 flag, torch capability {cap}")


def _want_cpu_bf16(setting) -> bool:
    """cfg "cpu_bf16": "auto" (default: on only with native bf16), true (force), false."""
    if setting == "auto":
        return cpu_bf16_support()[0]
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"cpu_bf16 must be \"auto\", true or false, got {setting!r}")


def autocast_context(dev: torch.device, cpu_bf16: bool = False):
    """fp16/bf16 autocast on CUDA (AMP), bf16 autocast on the CPU when asked, else a no-op."""
    if dev.type == "cuda":
        return torch.autocast("cuda")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(cpu_bf16))


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def predict(net: nn.Module, ds: CachedImages, device, batch_size: int = 32) -> np.ndarray:
    net.eval()
    aug, ds.augment = ds.augment, None
    out = []
    try:
        for i in range(0, len(ds), batch_size):
            x = torch.stack([ds[j][0] for j in range(i, min(i + batch_size, len(ds)))]).to(device)
            if device.type == "cuda":
                x = x.to(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                logits = net(x)
            out.append(torch.softmax(logits.float(), 1).cpu().numpy())
    finally:
        ds.augment = aug
    return np.concatenate(out) if out else np.zeros((0, len(ds.index)), np.float32)


def per_source_report(samples, labels, probs, classes, normal_class) -> dict:
    out = {}
    for src in sorted({s.source for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.source == src]
        out[src] = classification_report(labels[idx], probs[idx], classes, normal_class)
    return out


# -- the loop ------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    history: list
    best_val: dict


def _dataset_norm(train_ds: CachedImages, spec: PreprocessSpec) -> PreprocessSpec:
    """preprocess mean/std "dataset": the training split's own pixel mean/std (on the 0..1 scale,
    after resampling; e.g. Yang et al.'s radiography-specific normalisation)."""
    tot = sq = n = 0.0
    for a in train_ds.cache:
        a = a.astype(np.float64)
        tot, sq, n = tot + a.sum(), sq + (a * a).sum(), n + a.size
    mean = tot / max(n, 1)
    std = max(float(np.sqrt(max(sq / max(n, 1) - mean * mean, 0.0))), 1e-3)
    d = spec.to_dict()
    d["mean"], d["std"] = [round(mean, 6)] * spec.channels, [round(std, 6)] * spec.channels
    return PreprocessSpec.from_dict(d)


def _monitor_score(name: str, row: dict) -> float:
    """Higher is better: val_macro_f1 (default), val_acc, or val_loss (negated)."""
    if name == "val_loss":
        return -row["val_loss"]
    if name not in ("val_macro_f1", "val_acc"):
        raise ValueError(f"unknown monitor {name!r}; expected val_macro_f1, val_acc or val_loss")
    return row[name]


def train(cfg: dict, splits: dict[str, list[Sample]], run_dir, device: str = "auto", resume: bool = True,
          log=print) -> TrainResult:
    """Train one experiment. Under torchrun (world > 1) `batch_size` is the global batch: each of
    the world processes takes batch_size / world images per step (ShardedBatchSampler), so the
    papers' batch sizes mean the same thing on 1 or 8 GPUs; on CUDA BatchNorm becomes
    SyncBatchNorm (cfg "sync_bn", default true) so batch statistics are the global batch's too."""
    rank, world = dist_setup(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % max(1, torch.cuda.device_count())}")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    classes = list(cfg["data"]["classes"])
    pp = dict(cfg["preprocess"])
    dataset_norm = pp.get("mean") == "dataset" or pp.get("std") == "dataset"
    if dataset_norm:  # placeholder until the training images are cached
        ch = int(pp.get("channels", 3))
        pp["mean"], pp["std"] = [0.5] * ch, [0.25] * ch
    spec = PreprocessSpec.from_dict(pp)
    arch = dict(cfg["model"], num_classes=len(classes), in_channels=spec.channels, input_size=spec.size)
    arch.pop("init", None), arch.pop("init_path", None)
    net = build(arch)
    init_weights(net, cfg["model"])
    net.to(dev)
    if world > 1 and dev.type == "cuda" and cfg.get("sync_bn", True):
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # channels_last: faster convolutions on CUDA and on CPU alike (DenseNet121 at 160 px on the
    # 2-core CPU: 7.8 vs 6.1 img/s).
    channels_last = cfg.get("channels_last", True)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    t0 = time.time()
    train_ds = CachedImages(splits["train"], classes, spec, Augment.from_dict(cfg.get("augment"), seed + rank))
    val_ds = CachedImages(splits["val"], classes, spec)
    if dataset_norm:
        spec = train_ds.spec = val_ds.spec = _dataset_norm(train_ds, spec)
        if rank == 0:
            log(f"dataset normalisation: mean {spec.mean[0]:.4f} std {spec.std[0]:.4f}")
    if rank == 0:
        log(f"cached {len(train_ds)} train / {len(val_ds)} val images in {time.time() - t0:.0f}s")
    counts = np.bincount(train_ds.labels, minlength=len(classes))
    criterion = make_loss(cfg.get("loss", "ce"), counts).to(dev)
    bs = int(cfg.get("batch_size", 16))
    g = torch.Generator().manual_seed(seed)
    workers = int(cfg.get("workers", 0))
    if world > 1:
        batches = ShardedBatchSampler(train_ds, bs, rank, world, g, drop_last=len(train_ds) > bs)
        loader = torch.utils.data.DataLoader(train_ds, batch_sampler=batches, generator=g, num_workers=workers,
                                             worker_init_fn=_reseed_worker, pin_memory=dev.type == "cuda")
    elif cfg.get("samples_per_epoch") and int(cfg["samples_per_epoch"]) < len(train_ds):
        # shorter epochs (a fresh random subset each epoch, from the same seeded generator): more
        # frequent validation and checkpoints when one pass over the data takes too long (CPU)
        sampler = torch.utils.data.RandomSampler(train_ds, num_samples=int(cfg["samples_per_epoch"]), generator=g)
        loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=workers,
                                             drop_last=True, worker_init_fn=_reseed_worker if workers else None,
                                             pin_memory=dev.type == "cuda")
    else:
        loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, generator=g,
                                             num_workers=workers, drop_last=len(train_ds) > bs,
                                             worker_init_fn=_reseed_worker if workers else None,
                                             pin_memory=dev.type == "cuda")

    meta = {"architecture": arch, "classes": classes, "normal_class": cfg["data"].get("normal_class"),
            "preprocess": spec.to_dict(), "experiment": cfg.get("name"), "train_counts": counts.tolist()}
    phases = cfg.get("phases") or [{"name": "train", "epochs": cfg.get("epochs", 10), "trainable": "all"}]
    stop_cfg = cfg.get("early_stopping", {})
    monitor = cfg.get("monitor", "val_macro_f1")
    last_path, best_path, log_path = run_dir / "last.pt", run_dir / "best.safetensors", run_dir / "log.csv"

    state = {"phase": 0, "epoch": 0, "best_score": -math.inf, "bad_epochs": 0, "history": [], "done": False}
    opt_state = sched_state = None
    scaler = torch.amp.GradScaler(enabled=dev.type == "cuda")
    cpu_bf16 = dev.type == "cpu" and _want_cpu_bf16(cfg.get("cpu_bf16", "auto"))
    if rank == 0 and dev.type == "cpu":
        log(f"cpu bf16 autocast: {'on' if cpu_bf16 else 'off'} ({cpu_bf16_support()[1]})")
    if resume and last_path.is_file():
        saved = torch.load(last_path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["model"])
        state = json.loads(saved["state"])
        opt_state, sched_state = saved["optimizer"], saved.get("scheduler")
        torch.set_rng_state(saved["rng"])
        # the data order and augmentation streams continue where they stopped, so a resumed run
        # equals an uninterrupted one
        if saved.get("loader_rng") is not None:
            g.set_state(saved["loader_rng"])
        if saved.get("augment_rng") and train_ds.augment is not None:
            train_ds.augment.rng.bit_generator.state = json.loads(saved["augment_rng"])
        if saved.get("scaler"):
            scaler.load_state_dict(json.loads(saved["scaler"]))
        if rank == 0:
            log(f"resumed from {last_path}: phase {state['phase']} epoch {state['epoch']}")

    while state["phase"] < len(phases) and not state["done"]:
        ph = phases[state["phase"]]
        n_train = set_trainable(net, ph.get("trainable", "all"))
        # DDP is wrapped per phase: it registers the parameters that need gradients when built
        model = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None) \
            if world > 1 else net
        lr = float(ph.get("lr", cfg.get("optimizer", {}).get("lr", 1e-3)))
        opt = make_optimizer(cfg.get("optimizer", {}), [p for p in net.parameters() if p.requires_grad], lr)
        sched = make_scheduler(ph.get("schedule", cfg.get("schedule")), opt, int(ph["epochs"]), len(loader))
        if opt_state is not None:
            opt.load_state_dict(opt_state)
            if sched is not None and sched_state is not None:
                sched.load_state_dict(sched_state)
            opt_state = sched_state = None
        if rank == 0:
            log(f"phase {ph.get('name', state['phase'])}: {n_train:,} trainable parameters, lr {lr:g}")
        while state["epoch"] < int(ph["epochs"]):
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(len(state["history"]))
            train_mode(net)
            t = time.time()
            tot, n, correct = 0.0, 0, 0
            for step, (x, y) in enumerate(loader, 1):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if channels_last:
                    x = x.to(memory_format=torch.channels_last)
                with autocast_context(dev, cpu_bf16):
                    logits = model(x)
                    loss = criterion(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if sched is not None:
                    sched.step()
                tot += float(loss.detach()) * len(y)
                n += len(y)
                correct += int((logits.argmax(1) == y).sum())
                if rank == 0 and cfg.get("log_every") and step % int(cfg["log_every"]) == 0:
                    log(f"  step {step}/{len(loader)} loss {tot / n:.4f} {n * world / (time.time() - t):.1f} img/s")
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            secs = time.time() - t
            probs = predict(net, val_ds, dev)
            val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                                    torch.from_numpy(val_ds.labels)))
            rep = classification_report(val_ds.labels, probs, classes, cfg["data"].get("normal_class"))
            row = {"epoch": len(state["history"]) + 1, "phase": ph.get("name", state["phase"]),
                   "train_loss": tot / max(1, n), "train_acc": correct / max(1, n), "val_loss": val_loss,
                   "val_acc": rep["accuracy"], "val_macro_f1": rep["macro"]["f1"], "lr": opt.param_groups[0]["lr"],
                   "seconds": secs, "img_per_s": n * world / secs if secs else 0.0}
            state["history"].append(row)
            state["epoch"] += 1
            score = _monitor_score(monitor, row)
            # every rank keeps the same bookkeeping (the validation set and weights are the same
            # everywhere), so early stopping ends all DDP processes at the same epoch
            improved = score > state["best_score"]
            if improved:
                state["best_score"], state["bad_epochs"] = score, 0
            else:
                state["bad_epochs"] += 1
            if rank == 0:
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
                if improved:
                    save_checkpoint(best_path, net, dict(meta, val=rep, epoch=row["epoch"]))
                with open(log_path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    w.writeheader()
                    w.writerows(state["history"])
            if _should_stop(stop_cfg, state, row):
                state["done"] = True
            if _past_deadline(cfg.get("deadline"), time.time() - t):
                state["done"] = True
                if rank == 0:
                    log(f"stopping: another epoch would end after the deadline {cfg['deadline']}")
            phase_over = state["done"] or state["epoch"] >= int(ph["epochs"])
            if rank == 0 and phase_over and len(phases) > 1:
                # the weights at the end of each phase (e.g. Yapicioglu's feature-extraction result)
                save_checkpoint(run_dir / f"phase{state['phase']}.safetensors", net,
                                dict(meta, val=rep, epoch=row["epoch"], phase=ph.get("name", state["phase"])))
            if rank == 0:
                torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict() if sched is not None else None,
                            "state": json.dumps(state), "rng": torch.get_rng_state(),
                            "loader_rng": g.get_state(),
                            "augment_rng": json.dumps(train_ds.augment.rng.bit_generator.state)
                            if train_ds.augment is not None else "",
                            "scaler": json.dumps(scaler.state_dict()) if scaler.is_enabled() else ""}, last_path)
            if state["done"]:
                break
        if not state["done"]:
            state["phase"] += 1
            state["epoch"] = 0
    if world > 1:
        dist.barrier()
    best = json.loads(json.dumps(state["history"]))
    return TrainResult(run_dir, best_path, best, {"best_" + monitor: state["best_score"]})


def _past_deadline(deadline, epoch_seconds: float) -> bool:
    """deadline: a Unix time (number) or ISO-8601 text (UTC unless it names a zone), or None.
    True when one more epoch of `epoch_seconds` (this epoch's training + validation time) would
    end after it: the run then stops with its best checkpoint so far."""
    if not deadline:
        return False
    if isinstance(deadline, (int, float)):
        end = float(deadline)
    else:
        from datetime import datetime, timezone
        d = datetime.fromisoformat(str(deadline))
        end = (d if d.tzinfo else d.replace(tzinfo=timezone.utc)).timestamp()
    return time.time() + epoch_seconds > end


def _should_stop(cfg: dict, state: dict, row: dict) -> bool:
    if not cfg:
        return False
    if "target_val_acc" in cfg and row["val_acc"] >= cfg["target_val_acc"] and row["val_loss"] < cfg.get("max_val_loss", 1e9):
        return True  # El Azhari: stop once val acc >= 0.89 and val loss < 0.3
    return "patience" in cfg and state["bad_epochs"] >= int(cfg["patience"])


class InitWeightsMissing(FileNotFoundError):
    pass


def init_weights(net: CXRNet, model_cfg: dict):
    """init: "random" | "imagenet" (ImageNet weights from a local file: init_path, else torchvision's
    file in the local torch hub cache) | "checkpoint" (transfer from one of our checkpoints, e.g.
    COVID -> pneumonia: the backbone must fit; the head is taken only when its shape matches,
    i.e. the same number of classes, and is freshly initialised otherwise). Never downloads."""
    init = model_cfg.get("init", "random")
    if init == "random":
        return
    if init not in ("imagenet", "checkpoint"):
        raise ValueError(f"unknown init {init!r}; expected random, imagenet or checkpoint")
    path = model_cfg.get("init_path")
    if not path and init == "imagenet":
        from cxr_edge.architectures import cached_imagenet_weights
        path = cached_imagenet_weights(model_cfg["name"])
    if not path or not Path(path).is_file():
        what = ("ImageNet weights for " + model_cfg["name"] + " (torchvision's .pth, or timm's for the timm models)"
                if init == "imagenet" else "a cxr-edge checkpoint (best.safetensors of an earlier run)")
        raise InitWeightsMissing(
            f"this experiment starts from init {init!r} and needs {what}: pass --init-path FILE "
            f"(got {str(path) if path else 'nothing'}; nothing is downloaded), or --init random to train from "
            "random weights instead")
    if init == "imagenet":
        from cxr_edge.architectures import load_torchvision_weights
        load_torchvision_weights(net, model_cfg["name"], path)
    else:
        src, meta = load_checkpoint(path)
        own = net.state_dict()
        src_state = src.state_dict()
        bad = [k for k in own if k.startswith("backbone.") and (k not in src_state or src_state[k].shape != own[k].shape)]
        if bad:
            raise ValueError(f"{path}: its backbone ({meta['architecture'].get('name')}, "
                             f"{meta['architecture'].get('in_channels', 3)} channels) does not fit this model "
                             f"({model_cfg['name']}): e.g. {bad[:3]}")
        take = {k: v for k, v in src_state.items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(take, strict=False)
