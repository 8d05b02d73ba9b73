"""Experiments are data files (train/experiments/*.json). This module loads one, applies
command-line overrides, prepares the dataset and split, runs the loop and writes the report."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from .data import load_dataset, map_labels, split_by_patient

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


def apply_overrides(cfg: dict, epochs=None, image_size=None, limit=None, batch_size=None, seed=None) -> dict:
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
    return cfg


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
            idx = sorted(rng.choice(len(v), n, replace=False))
            splits[k] = [v[i] for i in idx]
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
    from .report import write_report
    from cxr_edge.metrics import classification_report
    from cxr_edge.preprocess import PreprocessSpec
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(cfg, indent=2))
    splits = prepare_splits(cfg, data_dir, force_test_sha256)
    write_split(splits, out / "split.json")
    log(f"{cfg['name']}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    t0 = time.time()
    res = train(cfg, splits, out, device=device, resume=resume, log=log)
    train_secs = time.time() - t0
    import torch.distributed as dist
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
        "train_seconds": train_secs, "device": str(dev), "history": res.history,
        "best_epoch": meta.get("epoch"),
        "test": classification_report(test_ds.labels, probs, classes, meta.get("normal_class")),
        "test_by_source": per_source_report(splits["test"], test_ds.labels, probs, classes, meta.get("normal_class")),
    }
    write_report(report, out)
    return report
