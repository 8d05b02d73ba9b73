"""Experiments are data files (train/experiments/*.json). This module loads one, applies
command-line overrides, prepares the dataset and split, runs the loop and writes the report."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from .data import cap_per_class, load_dataset, map_labels, split_by_patient

EXPERIMENTS = Path(__file__).parent / "experiments"


def list_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.json"))


def load_experiment(name_or_path: str) -> dict:
    p = Path(name_or_path)
    if not p.is_file():
        p = EXPERIMENTS / f"{name_or_path}.json"
    if not p.is_file():
        raise FileNotFoundError(f"experiment {name_or_path!r} not found; known: {', '.join(list_experiments())}")
    cfg = json.loads(p.read_text())
    cfg.setdefault("name", p.stem)
    return cfg


def apply_overrides(cfg: dict, epochs=None, image_size=None, limit=None, batch_size=None, seed=None,
                    in_channels=None, init=None, init_path=None) -> dict:
    """Command-line overrides for reduced runs: epochs (every phase), input size (a
    shorter_side_crop keeps its resize/crop ratio), training-image limit, batch size, seed,
    input channels (1: one gray channel, mean/std from the first channel; 3: pseudo-RGB),
    initialisation (random / imagenet / checkpoint) and its weights file."""
    cfg = copy.deepcopy(cfg)
    if epochs is not None:
        phases = cfg.get("phases") or [{"name": "train", "epochs": epochs, "trainable": "all"}]
        for ph in phases:
            ph["epochs"] = epochs
        cfg["phases"] = phases
    if image_size is not None:
        pp = cfg["preprocess"]
        if pp.get("resize") == "shorter_side_crop":
            pp["resize_size"] = int(round(pp["resize_size"] * image_size / pp["size"]))
        pp["size"] = image_size
    if limit is not None:
        cfg.setdefault("data", {})["limit"] = limit
    if batch_size is not None:
        cfg["batch_size"] = batch_size
    if seed is not None:
        cfg["seed"] = seed
    if in_channels is not None:
        pp = cfg["preprocess"]
        if int(in_channels) not in (1, 3):
            raise ValueError(f"--in-channels must be 1 or 3, got {in_channels}")
        for k in ("mean", "std"):
            if isinstance(pp.get(k), list) and len(pp[k]) != int(in_channels):
                v = pp[k]
                pp[k] = [round(sum(v) / len(v), 6)] * int(in_channels) if int(in_channels) == 1 else [v[0]] * 3
        pp["channels"] = int(in_channels)
    if init is not None:
        cfg["model"]["init"] = init
        if init == "random":
            cfg["model"].pop("init_path", None)
    if init_path is not None:
        cfg["model"]["init_path"] = str(init_path)
    return cfg


def _limit_part(v: list, n: int, rng) -> list:
    """n samples of v, spread over labels in proportion (at least one per label when n allows)."""
    if n >= len(v):
        return list(v)
    by: dict[str, list[int]] = {}
    for i, s in enumerate(v):
        by.setdefault(s.label, []).append(i)
    labels = sorted(by)
    want = {c: len(by[c]) * n / len(v) for c in labels}
    take = {c: min(len(by[c]), max(1 if n >= len(labels) else 0, int(want[c]))) for c in labels}
    # hand out what is left by largest remainder
    for c in sorted(labels, key=lambda c: want[c] - int(want[c]), reverse=True):
        if sum(take.values()) >= n:
            break
        if take[c] < len(by[c]):
            take[c] += 1
    while sum(take.values()) > n:  # the "at least one" floor overshot: trim the biggest
        c = max(labels, key=lambda c: take[c])
        take[c] -= 1
    idx = []
    for c in labels:
        idx += [by[c][j] for j in rng.choice(len(by[c]), take[c], replace=False)]
    return [v[i] for i in sorted(idx)]


def prepare_splits(cfg: dict, data_dir, force_test_sha256: set | None = None) -> dict:
    d = cfg["data"]
    samples = load_dataset(data_dir, d.get("layout", "auto"))
    samples = map_labels(samples, d.get("label_map"))
    classes = d["classes"]
    samples = [s for s in samples if s.label in classes]
    if d.get("exclude_views"):
        samples = [s for s in samples if s.view not in set(d["exclude_views"])]
    if d.get("sources"):
        samples = [s for s in samples if s.source in set(d["sources"])]
    masks = d.get("masks", "auto")  # true: lung-masked images (required); false: raw; auto: when present
    if masks is False:
        samples = [s if s.mask is None else type(s)(s.path, s.label, s.patient, s.source, s.view, None, s.sublabel)
                   for s in samples]
    elif masks is True:
        missing = [s.path for s in samples if not s.mask]
        if missing:
            raise ValueError(f"this experiment trains on lung-masked images (data.masks true) but {len(missing)} of "
                             f"{len(samples)} images have no mask (e.g. {missing[0]}); it needs a dataset with "
                             "masks, such as the COVID-19 Radiography Database layout <Class>/images + <Class>/masks")
    if d.get("max_per_class"):
        samples = cap_per_class(samples, d["max_per_class"], int(cfg.get("seed", 0)))
    missing_classes = [c for c in classes if not any(s.label == c for s in samples)]
    if missing_classes:
        raise ValueError(f"no images of class(es) {missing_classes} in {data_dir} after the label map "
                         f"(labels found: {sorted({s.label for s in load_dataset(data_dir, d.get('layout', 'auto'))})})")
    force = set()
    if force_test_sha256:
        import hashlib
        for s in samples:
            if hashlib.sha256(Path(s.path).read_bytes()).hexdigest() in force_test_sha256:
                force.add(s.patient)
    splits = split_by_patient(samples, tuple(d.get("split", (0.8, 0.1, 0.1))), int(cfg.get("seed", 0)), force)
    if d.get("limit"):
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        for k, v in splits.items():
            n = min(len(v), int(d["limit"]) if k == "train" else max(8, int(d["limit"]) // 4))
            splits[k] = _limit_part(v, n, rng)
    if "val" not in splits:
        # a train/test split (Bansal & Sridhar 80/20): as in the paper's Keras code, the test set
        # is also the validation set that picks the best epoch; report.md says so
        splits["val"] = splits["test"]
    return splits


def write_split(splits: dict, path: Path) -> None:
    """split.json: {part: [{path, label, patient, source, view}]}: what export/bench read as labelled sets."""
    from dataclasses import asdict
    path.write_text(json.dumps({k: [asdict(s) for s in v] for k, v in splits.items()}))


def read_split(path, part: str):
    from .data import Sample
    d = json.loads(Path(path).read_text())
    if part not in d:
        raise KeyError(f"{path}: no part {part!r} (has {', '.join(d)})")
    return [Sample(**s) for s in d[part]]


def run_experiment(cfg: dict, data_dir, out_dir, device="auto", resume=True, force_test_sha256=None, log=print) -> dict:
    """Train, then evaluate the best checkpoint on the test split; writes report.json/report.md/PNGs."""
    from .loop import CachedImages, per_source_report, predict, train
    from .checkpoint import load_checkpoint
    from .report import flat_metrics, write_report
    from cxr_edge.train.metrics import classification_report
    from cxr_edge.preprocess import PreprocessSpec
    import torch

    import os
    import torch.distributed as dist
    out = Path(out_dir)
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes and logs
    out.mkdir(parents=True, exist_ok=True)
    splits = prepare_splits(cfg, data_dir, force_test_sha256)
    if rank0:
        (out / "experiment.json").write_text(json.dumps(cfg, indent=2))
        write_split(splits, out / "split.json")
        log(f"{cfg['name']}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    t0 = time.time()
    res = train(cfg, splits, out, device=device, resume=resume, log=log if rank0 else (lambda m: None))
    train_secs = time.time() - t0
    if dist.is_initialized() and dist.get_rank() != 0:
        return {}
    net, meta = load_checkpoint(res.best_checkpoint)
    classes = meta["classes"]
    test_ds = CachedImages(splits["test"], classes, PreprocessSpec.from_dict(meta["preprocess"]))
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    probs = predict(net.to(dev), test_ds, dev)
    report = {
        "experiment": cfg["name"], "paper": cfg.get("paper"), "reported": cfg.get("reported"),
        "config": cfg, "data_dir": str(data_dir), "counts": {k: len(v) for k, v in splits.items()},
        "val_is_test": splits["val"] is splits["test"],
        "train_seconds": train_secs, "device": str(dev), "history": res.history,
        "best_epoch": meta.get("epoch"),
        "test": classification_report(test_ds.labels, probs, classes, meta.get("normal_class")),
        "test_by_source": per_source_report(splits["test"], test_ds.labels, probs, classes, meta.get("normal_class")),
        "test_predictions": {"paths": [s.path for s in splits["test"]], "labels": test_ds.labels.tolist(),
                             "probs": np.round(probs, 6).tolist()},
    }
    # multi-phase experiments: the test result at the end of each phase (e.g. Yapicioglu's
    # feature-extraction accuracy before fine-tuning)
    phases = cfg.get("phases") or []
    if len(phases) > 1:
        report["test_by_phase"] = {}
        for i, ph in enumerate(phases):
            f = out / f"phase{i}.safetensors"
            if f.is_file():
                pnet, pmeta = load_checkpoint(f)
                pprobs = predict(pnet.to(dev), test_ds, dev)
                report["test_by_phase"][ph.get("name", str(i))] = classification_report(
                    test_ds.labels, pprobs, classes, meta.get("normal_class"))
    report["reproduced"] = flat_metrics(report)
    write_report(report, out)
    return report
