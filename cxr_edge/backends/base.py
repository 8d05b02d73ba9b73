"""Backend interface and registry. A backend sees only ready (N, C, H, W) float32 tensors."""
from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

REGISTRY: dict[str, type["Backend"]] = {}


class BackendError(Exception):
    """A backend could not load or run a model."""


def register(cls):
    REGISTRY[cls.name] = cls
    return cls


class Backend(abc.ABC):
    name: str = ""
    precisions: tuple = ()      # run precisions this backend offers (keys of formats.RUN_PRECISIONS)
    devices: tuple = ("cpu",)
    supports_async: bool = False

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(usable here, why or why not). Must be cheap and must not raise."""

    def __init__(self, package, artifact, precision: str, threads: int | None = None, options: dict | None = None):
        self.package = package
        self.artifact = artifact
        self.precision = precision
        self.threads = threads
        self.options = options or {}
        self.device = "cpu"

    @property
    def artifact_path(self) -> Path:
        return self.package.path(self.artifact)

    @abc.abstractmethod
    def infer(self, batch: np.ndarray, features: bool = False) -> dict[str, np.ndarray]:
        """{'logits': (N, K)} and, when asked and the artifact has it, {'features': (N, C, h, w)}."""

    def infer_async(self, batch: np.ndarray, features: bool = False):
        """A handle with .result() -> same as infer. Default: synchronous."""
        return _Done(self.infer(batch, features))

    def describe(self) -> str:
        return f"{self.name} {self.precision} on {self.device} ({self.artifact.file})"

    def close(self):
        pass


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value
