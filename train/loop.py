"""One training loop for every experiment: CPU or CUDA (AMP + channels_last), deterministic seeds,
best-val checkpoint, resumable, early stopping, per-epoch CSV log, DDP through torchrun (gloo on CPU).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable
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
    SyncBatchNorm (cfg "sync_bn", default true) so batch statistics are the global batch's too.

    Writes run_dir/last.pt after every epoch (with resume=True a run continues from it, data order
    and augmentation streams included), best.safetensors on every improvement of cfg "monitor",
    log.csv, and phase<i>.safetensors at the end of each phase of a multi-phase run."""
    run = _prepare_run(cfg, splits, run_dir, device, log)
    phases = cfg.get("phases") or [{"name": "train", "epochs": cfg.get("epochs", 10), "trainable": "all"}]
    state = {"phase": 0, "epoch": 0, "best_score": -math.inf, "bad_epochs": 0, "history": [], "done": False}
    saved_opt = None
    if resume and run.last_path.is_file():
        state, saved_opt = _restore_last(run)
    while state["phase"] < len(phases) and not state["done"]:
        phase = _start_phase(run, phases[state["phase"]], state["phase"], saved_opt)
        saved_opt = None  # only the phase that was interrupted continues from a saved optimiser
        _run_phase(run, phase, state, save_phase_end=len(phases) > 1)
        if not state["done"]:
            state["phase"] += 1
            state["epoch"] = 0
    if run.world > 1:
        dist.barrier()
    history = json.loads(json.dumps(state["history"]))
    monitor = cfg.get("monitor", "val_macro_f1")
    return TrainResult(run.run_dir, run.best_path, history, {"best_" + monitor: state["best_score"]})


@dataclass
class _Run:
    """What every step of one training run shares; built once by `_prepare_run`."""
    cfg: dict
    rank: int
    world: int
    dev: torch.device
    net: nn.Module                       # the bare network (DDP wraps it per phase: `_Phase.model`)
    train_ds: CachedImages
    val_ds: CachedImages
    loader: torch.utils.data.DataLoader
    generator: torch.Generator           # the loader's: saved in last.pt so a resumed run keeps the data order
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    cpu_bf16: bool
    channels_last: bool
    meta: dict                           # written into every checkpoint
    run_dir: Path
    log: Callable[[str], None]

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.safetensors"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.csv"


@dataclass
class _Phase:
    """One phase's training objects. DDP is wrapped per phase: it registers the parameters that
    need gradients when it is built, and the trainable set changes between phases."""
    name: object                          # cfg "name", else the phase index (as log.csv records it)
    epochs: int
    model: nn.Module                      # the network, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None


@dataclass
class _EpochStats:
    """One epoch's training pass: summed loss, image and correct counts, and its timing."""
    loss_sum: float
    images: int
    correct: int
    started: float                        # time.time() at the start: the deadline counts validation too
    seconds: float                        # the training pass alone


def _prepare_run(cfg: dict, splits: dict, run_dir, device: str, log) -> _Run:
    """Seeds, device, network, cached data, loss, loader and AMP state of one run. The order is
    the original one on purpose: it fixes which random numbers the weight initialisation takes."""
    rank, world = dist_setup(device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = _pick_device(device, rank, world)
    classes = list(cfg["data"]["classes"])
    spec, dataset_norm = _initial_spec(cfg)
    net, arch = _build_net(cfg, classes, spec, dev, world)
    train_ds, val_ds, spec = _cache_datasets(cfg, splits, classes, spec, dataset_norm, seed + rank, rank, log)
    counts = np.bincount(train_ds.labels, minlength=len(classes))
    criterion = make_loss(cfg.get("loss", "ce"), counts).to(dev)
    g = torch.Generator().manual_seed(seed)
    loader = _make_loader(cfg, train_ds, g, rank, world, dev)
    meta = {"architecture": arch, "classes": classes, "normal_class": cfg["data"].get("normal_class"),
            "preprocess": spec.to_dict(), "experiment": cfg.get("name"), "train_counts": counts.tolist()}
    scaler = torch.amp.GradScaler(enabled=dev.type == "cuda")
    cpu_bf16 = dev.type == "cpu" and _want_cpu_bf16(cfg.get("cpu_bf16", "auto"))
    if rank == 0 and dev.type == "cpu":
        log(f"cpu bf16 autocast: {'on' if cpu_bf16 else 'off'} ({cpu_bf16_support()[1]})")
    return _Run(cfg=cfg, rank=rank, world=world, dev=dev, net=net, train_ds=train_ds, val_ds=val_ds,
                loader=loader, generator=g, criterion=criterion, scaler=scaler, cpu_bf16=cpu_bf16,
                channels_last=bool(cfg.get("channels_last", True)), meta=meta, run_dir=run_dir, log=log)


def _pick_device(device: str, rank: int, world: int) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; under DDP on CUDA each process takes GPU
    LOCAL_RANK (modulo the GPUs it sees)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % max(1, torch.cuda.device_count())}")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dev


def _initial_spec(cfg: dict) -> tuple[PreprocessSpec, bool]:
    """(spec, dataset_norm): cfg "preprocess" as a spec. dataset_norm: its mean/std are "dataset",
    held by placeholders until the training images are cached (then `_dataset_norm`)."""
    pp = dict(cfg["preprocess"])
    dataset_norm = pp.get("mean") == "dataset" or pp.get("std") == "dataset"
    if dataset_norm:
        ch = int(pp.get("channels", 3))
        pp["mean"], pp["std"] = [0.5] * ch, [0.25] * ch
    return PreprocessSpec.from_dict(pp), dataset_norm


def _build_net(cfg: dict, classes: list, spec: PreprocessSpec, dev: torch.device, world: int) -> tuple[nn.Module, dict]:
    """(network on `dev`, initialised as cfg "model" "init" says; its architecture dict)."""
    arch = dict(cfg["model"], num_classes=len(classes), in_channels=spec.channels, input_size=spec.size)
    arch.pop("init", None), arch.pop("init_path", None)
    net = build(arch)
    init_weights(net, cfg["model"])
    net.to(dev)
    if world > 1 and dev.type == "cuda" and cfg.get("sync_bn", True):
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    # channels_last: faster convolutions on CUDA and on CPU alike (DenseNet121 at 160 px on the
    # 2-core CPU: 7.8 vs 6.1 img/s).
    if cfg.get("channels_last", True):
        net = net.to(memory_format=torch.channels_last)
    return net, arch


def _cache_datasets(cfg: dict, splits: dict, classes: list, spec: PreprocessSpec, dataset_norm: bool,
                    augment_seed: int, rank: int, log) -> tuple[CachedImages, CachedImages, PreprocessSpec]:
    """(train set with augmentation, val set, spec). With dataset_norm the spec's mean/std become
    the training images' own, in both sets and in what the checkpoints record."""
    t0 = time.time()
    train_ds = CachedImages(splits["train"], classes, spec, Augment.from_dict(cfg.get("augment"), augment_seed))
    val_ds = CachedImages(splits["val"], classes, spec)
    if dataset_norm:
        spec = train_ds.spec = val_ds.spec = _dataset_norm(train_ds, spec)
        if rank == 0:
            log(f"dataset normalisation: mean {spec.mean[0]:.4f} std {spec.std[0]:.4f}")
    if rank == 0:
        log(f"cached {len(train_ds)} train / {len(val_ds)} val images in {time.time() - t0:.0f}s")
    return train_ds, val_ds, spec


def _make_loader(cfg: dict, train_ds: CachedImages, g: torch.Generator, rank: int, world: int,
                 dev: torch.device) -> torch.utils.data.DataLoader:
    """The training loader, shuffled by `g`: DDP shards of the global batch, a random subset of
    cfg "samples_per_epoch" images per epoch, or every image once per epoch."""
    bs = int(cfg.get("batch_size", 16))
    workers = int(cfg.get("workers", 0))
    pin = dev.type == "cuda"
    if world > 1:
        batches = ShardedBatchSampler(train_ds, bs, rank, world, g, drop_last=len(train_ds) > bs)
        return torch.utils.data.DataLoader(train_ds, batch_sampler=batches, generator=g, num_workers=workers,
                                           worker_init_fn=_reseed_worker, pin_memory=pin)
    if cfg.get("samples_per_epoch") and int(cfg["samples_per_epoch"]) < len(train_ds):
        # shorter epochs (a fresh random subset each epoch, from the same seeded generator): more
        # frequent validation and checkpoints when one pass over the data takes too long (CPU)
        sampler = torch.utils.data.RandomSampler(train_ds, num_samples=int(cfg["samples_per_epoch"]), generator=g)
        return torch.utils.data.DataLoader(train_ds, batch_size=bs, sampler=sampler, num_workers=workers,
                                           drop_last=True, worker_init_fn=_reseed_worker if workers else None,
                                           pin_memory=pin)
    return torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, generator=g,
                                       num_workers=workers, drop_last=len(train_ds) > bs,
                                       worker_init_fn=_reseed_worker if workers else None, pin_memory=pin)


def _restore_last(run: _Run) -> tuple[dict, tuple]:
    """Load last.pt into the network, the random streams and the AMP scaler. Returns (loop state,
    (optimizer state, scheduler state)) for the phase that was interrupted."""
    saved = torch.load(run.last_path, map_location="cpu", weights_only=True)
    run.net.load_state_dict(saved["model"])
    state = json.loads(saved["state"])
    torch.set_rng_state(saved["rng"])
    # the data order and augmentation streams continue where they stopped, so a resumed run
    # equals an uninterrupted one
    if saved.get("loader_rng") is not None:
        run.generator.set_state(saved["loader_rng"])
    if saved.get("augment_rng") and run.train_ds.augment is not None:
        run.train_ds.augment.rng.bit_generator.state = json.loads(saved["augment_rng"])
    if saved.get("scaler"):
        run.scaler.load_state_dict(json.loads(saved["scaler"]))
    if run.rank == 0:
        run.log(f"resumed from {run.last_path}: phase {state['phase']} epoch {state['epoch']}")
    return state, (saved["optimizer"], saved.get("scheduler"))


def _start_phase(run: _Run, ph: dict, index: int, saved_opt: tuple | None) -> _Phase:
    """Set phase `ph`'s trainable layers and build its model, optimiser and schedule; saved_opt:
    (optimizer state, scheduler state) to continue from when resuming inside this phase."""
    cfg, net = run.cfg, run.net
    n_train = set_trainable(net, ph.get("trainable", "all"))
    model = nn.parallel.DistributedDataParallel(net, device_ids=[run.dev.index] if run.dev.type == "cuda" else None) \
        if run.world > 1 else net
    lr = float(ph.get("lr", cfg.get("optimizer", {}).get("lr", 1e-3)))
    opt = make_optimizer(cfg.get("optimizer", {}), [p for p in net.parameters() if p.requires_grad], lr)
    sched = make_scheduler(ph.get("schedule", cfg.get("schedule")), opt, int(ph["epochs"]), len(run.loader))
    if saved_opt is not None:
        opt_state, sched_state = saved_opt
        opt.load_state_dict(opt_state)
        if sched is not None and sched_state is not None:
            sched.load_state_dict(sched_state)
    if run.rank == 0:
        run.log(f"phase {ph.get('name', index)}: {n_train:,} trainable parameters, lr {lr:g}")
    return _Phase(ph.get("name", index), int(ph["epochs"]), model, opt, sched)


def _run_phase(run: _Run, phase: _Phase, state: dict, save_phase_end: bool) -> None:
    """The epochs of one phase from state["epoch"] on, until the phase ends or the run stops
    (state["done"]). After every epoch last.pt holds all a resumed run needs."""
    while state["epoch"] < phase.epochs:
        stats = _train_epoch(run, phase, len(state["history"]))
        row, rep = _validate(run, phase, state, stats)
        _record_epoch(run, state, row, rep)
        _check_stop(run, state, row, stats.started)
        if run.rank == 0 and save_phase_end and (state["done"] or state["epoch"] >= phase.epochs):
            # the weights at the end of each phase (e.g. Yapicioglu's feature-extraction result)
            save_checkpoint(run.run_dir / f"phase{state['phase']}.safetensors", run.net,
                            dict(run.meta, val=rep, epoch=row["epoch"], phase=phase.name))
        if run.rank == 0:
            _save_last(run, phase, state)
        if state["done"]:
            break


def _train_epoch(run: _Run, phase: _Phase, epoch_index: int) -> _EpochStats:
    """One pass over the training loader; epoch_index (epochs done so far, all phases) reseeds a
    DDP sampler so every process draws the same global batches."""
    if hasattr(run.loader.sampler, "set_epoch"):
        run.loader.sampler.set_epoch(epoch_index)
    train_mode(run.net)
    t = time.time()
    tot, n, correct = 0.0, 0, 0
    log_every = run.cfg.get("log_every")
    for step, (x, y) in enumerate(run.loader, 1):
        loss, hits = _train_step(run, phase, x, y)
        tot += loss * len(y)
        n += len(y)
        correct += hits
        if run.rank == 0 and log_every and step % int(log_every) == 0:
            run.log(f"  step {step}/{len(run.loader)} loss {tot / n:.4f} "
                    f"{n * run.world / (time.time() - t):.1f} img/s")
    if run.dev.type == "cuda":
        torch.cuda.synchronize(run.dev)
    return _EpochStats(tot, n, correct, t, time.time() - t)


def _train_step(run: _Run, phase: _Phase, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One optimiser (and schedule) step on the batch (x (B, C, H, W) float32, y (B,) int64).
    Returns (mean loss of the batch, number of correct top-1 predictions)."""
    x, y = x.to(run.dev, non_blocking=True), y.to(run.dev, non_blocking=True)
    if run.channels_last:
        x = x.to(memory_format=torch.channels_last)
    with autocast_context(run.dev, run.cpu_bf16):
        logits = phase.model(x)
        loss = run.criterion(logits.float(), y)
    phase.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(phase.opt)
    run.scaler.update()
    if phase.sched is not None:
        phase.sched.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


def _validate(run: _Run, phase: _Phase, state: dict, stats: _EpochStats) -> tuple[dict, dict]:
    """(log.csv row of this epoch, classification report on the validation set)."""
    probs = predict(run.net, run.val_ds, run.dev)
    labels = run.val_ds.labels
    val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                            torch.from_numpy(labels)))
    rep = classification_report(labels, probs, run.meta["classes"], run.meta["normal_class"])
    n, secs = stats.images, stats.seconds
    row = {"epoch": len(state["history"]) + 1, "phase": phase.name,
           "train_loss": stats.loss_sum / max(1, n), "train_acc": stats.correct / max(1, n), "val_loss": val_loss,
           "val_acc": rep["accuracy"], "val_macro_f1": rep["macro"]["f1"], "lr": phase.opt.param_groups[0]["lr"],
           "seconds": secs, "img_per_s": n * run.world / secs if secs else 0.0}
    return row, rep


def _record_epoch(run: _Run, state: dict, row: dict, rep: dict) -> None:
    """Append the row and track the best cfg "monitor" score; rank 0 logs the row, writes
    best.safetensors on an improvement and rewrites log.csv."""
    state["history"].append(row)
    state["epoch"] += 1
    score = _monitor_score(run.cfg.get("monitor", "val_macro_f1"), row)
    # every rank keeps the same bookkeeping (the validation set and weights are the same
    # everywhere), so early stopping ends all DDP processes at the same epoch
    improved = score > state["best_score"]
    if improved:
        state["best_score"], state["bad_epochs"] = score, 0
    else:
        state["bad_epochs"] += 1
    if run.rank == 0:
        run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if improved:
            save_checkpoint(run.best_path, run.net, dict(run.meta, val=rep, epoch=row["epoch"]))
        _write_log_csv(run.log_path, state["history"])


def _write_log_csv(path: Path, history: list[dict]) -> None:
    """log.csv: one row per epoch so far, columns as in the latest row."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[-1]))
        w.writeheader()
        w.writerows(history)


def _check_stop(run: _Run, state: dict, row: dict, epoch_started: float) -> None:
    """Mark the run done on early stopping, or when another epoch as long as this one (training +
    validation) would end after cfg "deadline"."""
    if _should_stop(run.cfg.get("early_stopping", {}), state, row):
        state["done"] = True
    if _past_deadline(run.cfg.get("deadline"), time.time() - epoch_started):
        state["done"] = True
        if run.rank == 0:
            run.log(f"stopping: another epoch would end after the deadline {run.cfg['deadline']}")


def _save_last(run: _Run, phase: _Phase, state: dict) -> None:
    """last.pt: weights, optimiser, schedule, loop state, every random stream (torch, loader,
    augmentation) and the AMP scaler: what `_restore_last` needs to continue exactly."""
    aug = run.train_ds.augment
    torch.save({"model": run.net.state_dict(), "optimizer": phase.opt.state_dict(),
                "scheduler": phase.sched.state_dict() if phase.sched is not None else None,
                "state": json.dumps(state), "rng": torch.get_rng_state(),
                "loader_rng": run.generator.get_state(),
                "augment_rng": json.dumps(aug.rng.bit_generator.state) if aug is not None else "",
                "scaler": json.dumps(run.scaler.state_dict()) if run.scaler.is_enabled() else ""}, run.last_path)


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
