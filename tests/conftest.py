"""Shared fixtures. Real networks, real images, real backends: nothing here is mocked.

`tiny_package` is a torchvision DenseNet121 with fixed random weights at a small input size,
exported through the real export pipeline and gated on the repository's sample X-rays: it
exercises every mechanism without a trained model. `default_package` is the shipped model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SHARED_DATA = ROOT.parent / "shared" / "data"
CXR = SHARED_DATA / "cxr"
CXR_DICOM = SHARED_DATA / "cxr-dicom"


@pytest.fixture(scope="session", autouse=True)
def _verdict_cache(tmp_path_factory):
    """On-device verdicts (cxr_edge.verify) go to a per-session cache, never the user's."""
    old = os.environ.get("CXR_EDGE_CACHE")
    os.environ["CXR_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cxr-edge-cache"))
    yield
    if old is None:
        os.environ.pop("CXR_EDGE_CACHE", None)
    else:
        os.environ["CXR_EDGE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _shipped_package_untouched():
    """Tests link the shipped package's files into scratch packages (hard links: cheap); a test
    that writes through such a link would corrupt the shipped model. Fail the run if that happened."""
    from cxr_edge.package import DEFAULT_PACKAGE, ModelPackage
    yield
    try:
        ModelPackage.read(DEFAULT_PACKAGE)
    except Exception as e:  # noqa: BLE001 - any failure here means a test damaged the shipped package
        pytest.fail(f"a test modified the shipped model package (restore it with git): {e}")


def sample_images() -> list[Path]:
    return sorted(SAMPLES.glob("*.jpeg"))


def need_shared_cxr():
    if not (CXR / "manifest.csv").is_file():
        pytest.skip(f"real chest X-rays not found at {CXR} (../shared/data/cxr beside the checkout)")
    return CXR


def shared_images(n: int, seed: int = 0, labels=("covid", "normal", "pneumonia")):
    """n real images from ../shared/data/cxr, spread over labels and sources (deterministic)."""
    from cxr_edge.train.data import load_manifest
    samples = [s for s in load_manifest(need_shared_cxr()) if s.label in labels and s.view != "L"]
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(samples), min(n, len(samples)), replace=False)
    return [samples[i] for i in sorted(idx)]


def _need_torch():
    pytest.importorskip("torch", reason="the workbench (torch) is needed to build a test package")
    pytest.importorskip("torchvision", reason="the workbench (torchvision) is needed to build a test package")


def build_checkpoint(path: Path, size: int = 96, seed: int = 0, arch: str = "densenet121", head: str = "linear",
                     mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> Path:
    import torch
    from cxr_edge.preprocess import PreprocessSpec
    from cxr_edge.train.checkpoint import save_checkpoint
    from cxr_edge.architectures import build
    torch.manual_seed(seed)
    architecture = {"name": arch, "head": head, "num_classes": 3, "in_channels": 3, "dropout": 0.0, "input_size": size}
    net = build(architecture).eval()
    spec = PreprocessSpec(size=size, resize="stretch", channels=3, mean=mean, std=std)
    save_checkpoint(path, net, {"architecture": architecture, "classes": ["covid", "normal", "pneumonia"],
                                "normal_class": "normal", "preprocess": spec.to_dict(), "experiment": "test-random"})
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    _need_torch()
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.safetensors")


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory, tiny_checkpoint) -> Path:
    """fp32 + int8 package from the random DenseNet121, gated on the 16 sample X-rays."""
    from cxr_edge.export import (
        ExportSettings,
        GateSettings,
        Int8Settings,
        export_checkpoint,
    )
    out = tmp_path_factory.mktemp("pkg") / "tiny.cxrpkg"
    # keep_failed: random weights give near-uniform probabilities, where int8 rounding may flip
    # a top-1 between near-ties; the mechanics under test do not depend on int8 passing.
    settings = ExportSettings(precisions=("fp32", "int8"), gate=GateSettings(val=str(SAMPLES), keep_failed=True),
                              int8=Int8Settings(calib=str(SAMPLES), calib_size=16))
    export_checkpoint(tiny_checkpoint, out, settings, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def default_package() -> Path:
    from cxr_edge.package import DEFAULT_PACKAGE
    if not (DEFAULT_PACKAGE / "model.json").is_file():
        pytest.skip("the default model package has not been built into this checkout yet")
    return DEFAULT_PACKAGE
