"""`cxr-edge train` on the layouts its --help promises: class folders work with the default experiment."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="train/ needs the workbench (torch)")

from cxr_edge.train.data import load_dataset  # noqa: E402
from cxr_edge.train.experiment import load_experiment, prepare_splits  # noqa: E402


def _folders(root, per_class=12):
    rng = np.random.default_rng(0)
    for cls in ("covid", "normal", "pneumonia"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(root / cls / f"{cls}{i:02d}.png")
    return root


def test_default_experiment_splits_class_folders(tmp_path):
    ds = _folders(tmp_path / "ds")
    splits = prepare_splits(load_experiment("default_densenet121"), ds)
    parts = {k: v for k, v in splits.items() if isinstance(v, list)}
    assert sum(len(v) for v in parts.values()) == 36
    assert {s.label for v in parts.values() for s in v} == {"covid", "normal", "pneumonia"}


def test_missing_manifest_names_the_fix(tmp_path):
    ds = _folders(tmp_path / "ds", per_class=1)
    with pytest.raises(FileNotFoundError, match="--layout folders"):
        load_dataset(ds, "manifest")
