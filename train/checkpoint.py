"""Checkpoints: weights in safetensors with the model's metadata (architecture, classes,
preprocessing, metrics) in its header; nothing is unpickled when loading."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, safe_open

from cxr_edge.preprocess import PreprocessSpec

META_KEY = "cxr_edge"


def save_checkpoint(path, net: torch.nn.Module, meta: dict):
    """meta: {architecture, classes, normal_class, preprocess, provenance...}"""
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta)})
    tmp.replace(path)


def read_meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
    if META_KEY not in md:
        raise ValueError(f"{path}: not a cxr-edge checkpoint (no '{META_KEY}' metadata)")
    return json.loads(md[META_KEY])


def load_checkpoint(path):
    """(net in eval mode, meta)."""
    from cxr_edge.architectures import build
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    meta = read_meta(path)
    net = build(meta["architecture"])
    state = load_file(str(path))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit {meta['architecture']['name']}: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    PreprocessSpec.from_dict(meta["preprocess"])  # validate early
    return net.eval(), meta
