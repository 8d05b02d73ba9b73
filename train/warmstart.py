"""Turn a model package back into a training checkpoint (warm start).

The package's fp32 ONNX initializers are the network's state_dict (see
cxr_edge.backends.torch_backend.reference_state_dict); this writes them, with the package's
architecture, classes and preprocessing, as a cxr-edge safetensors checkpoint that an experiment
can start from (`"init": "checkpoint"`, `--init-path`).

    python -m cxr_edge.train.warmstart cxr_edge/models/default.cxrpkg runs/init/default_v1.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path


def checkpoint_from_package(package_dir, out) -> Path:
    """Write PACKAGE's reference weights as a checkpoint at OUT; returns OUT.
    Raises FileNotFoundError / cxr_edge.package.PackageError on a missing or invalid package,
    ValueError when the weights do not fit the package's architecture."""
    from cxr_edge.backends.base import BackendError
    from cxr_edge.backends.torch_backend import reference_network
    from cxr_edge.package import ModelPackage

    from .checkpoint import save_checkpoint

    pkg = ModelPackage.read(package_dir)
    arch = dict(pkg.architecture)
    try:
        net = reference_network(pkg)
    except BackendError as e:
        raise ValueError(str(e)) from None
    meta = {"architecture": arch, "classes": list(pkg.classes), "normal_class": pkg.normal_class,
            "preprocess": pkg.preprocess.to_dict() if hasattr(pkg.preprocess, "to_dict") else dict(pkg.preprocess),
            "experiment": f"warm start from package {pkg.name}", "source_package": str(Path(package_dir).resolve())}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, net, meta)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    print(checkpoint_from_package(a.package, a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
