"""Backend interface and registry. A backend sees only ready (N, C, H, W) float32 tensors."""
from __future__ import annotations

import abc
from concurrent.futures import Future
from pathlib import Path

import numpy as np

REGISTRY: dict[str, type["Backend"]] = {}


class BackendError(Exception):
    """A backend could not load or run a model."""


def nvidia_gpu_present() -> bool:
    """Cheap test for an NVIDIA driver (desktop/server GPUs or Jetson), without importing any CUDA
    library: lets CPU-only machines skip importing torch or cuda-python to find out."""
    import os
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/nvhost-ctrl-gpu",
                                          "/dev/nvgpu/igpu0/ctrl"))


def register(cls):
    """Class decorator: add a Backend subclass to REGISTRY under its `name`, and return it."""
    REGISTRY[cls.name] = cls
    return cls


class Backend(abc.ABC):
    """A model runtime: runs ready (N, C, H, W) float32 tensors through one package artifact.

    Subclasses set `name`, implement `available` and `infer`, and register with `@register`. Which
    precisions run from which artifact, on which devices, is formats.RUNS. `options` is a dict of
    backend-specific keys (see each subclass); `threads` None means the backend's choice.
    """
    name: str = ""
    # Which precisions a backend runs, from which artifact, on which devices: formats.RUNS, the one
    # place (run_precisions() reads it).
    supports_async: bool = False

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here, why or why not). Must be cheap and must not raise."""

    @classmethod
    def run_precisions(cls) -> tuple:
        """Run precisions of this backend (formats.RUNS order)."""
        from ..formats import RUN_PRECISIONS
        return tuple(RUN_PRECISIONS.get(cls.name, {}))

    @classmethod
    def supports(cls, precision: str, options: dict | None = None) -> tuple[bool, str]:
        """(whether this machine runs `precision` on this backend, why not). Beyond available():
        device capabilities (native bf16, a GPU). Cheap; must not raise."""
        from ..formats import run
        r = run(cls.name, precision)
        if r is None:
            from ..formats import RUN_PRECISIONS
            return False, f"not a precision {cls.name} runs (formats.RUNS: {', '.join(RUN_PRECISIONS.get(cls.name, {}))})"
        return True, ""

    @classmethod
    def target_device(cls, precision: str, options: dict | None = None) -> str:
        """The device kind ("cpu" or "cuda") this backend runs `precision` on with these options."""
        from ..formats import run
        r = run(cls.name, precision)
        return r.devices[0] if r else "cpu"

    def __init__(self, package, artifact, precision: str, threads: int | None = None, options: dict | None = None):
        self.package = package
        self.artifact = artifact
        self.precision = precision
        self.threads = threads
        self.options = options or {}
        self.device = "cpu"

    @property
    def artifact_path(self) -> Path:
        """The path of the artifact's file in the package directory."""
        return self.package.path(self.artifact)

    @abc.abstractmethod
    def infer(self, batch: np.ndarray, features: bool = False) -> dict[str, np.ndarray]:
        """{'logits': (N, K)} and, when asked and the artifact has it, {'features': (N, C, h, w)}."""

    def infer_async(self, batch: np.ndarray, features: bool = False):
        """A `concurrent.futures.Future`-like handle whose .result() is what `infer` returns.
        Default: computed now, synchronously."""
        done: Future = Future()
        done.set_result(self.infer(batch, features))
        return done

    def infer_one_async(self, batch: np.ndarray, features: bool = False):
        """As `infer_async`, for one input that waits alone (`Classifier.predict_one`): a backend whose
        batched engine leaves cores idle at batch 1 runs it on a latency engine instead. Default:
        `infer_async`."""
        return self.infer_async(batch, features)

    def describe(self) -> str:
        """"<name> <precision> on <device> (<artifact file>)"."""
        return f"{self.name} {self.precision} on {self.device} ({self.artifact.file})"

    def close(self):
        """Release the runtime's resources; the base class holds none."""
        pass

