"""Postprocessing: logits -> probabilities -> `Result`. CAM maths live in `cam.py`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DISCLAIMER = "Research software, not a medical device: not for diagnostic use."


@dataclass
class Result:
    """The outcome for one input, in input order; never raised, always returned.

    Attributes:
        source: the input's path, or `<bytes>` / `<array>` / `<PIL image>` for in-memory inputs.
        label: the predicted class name (None when `error` is set).
        probabilities: {class name: probability}, softmax of the logits, summing to 1.
        error: why the input could not be classified (names the input and the cause), else None.
        backend, precision: what computed it (e.g. "openvino", "int8").
        cam: (H, W) float32 0..1 heatmap at the image's original size, when asked for.
        cam_method: "CAM" (exact), "Grad-CAM", or "approximate Grad-CAM" (see cam.py).
        original_size: (width, height) of the decoded image before resampling.
        margin: top-1 minus top-2 probability, 0..1 (None for an error result).
        uncertain: True when the margin is below 2 x the p99 |Δp| measured for the running
            backend/precision against torch fp32 (the label might differ from the reference model's);
            None when no such measurement exists. Rule: cxr_edge/nearties.py.
        warnings: list of str, each naming the input: what decode noticed but did not refuse (header
            contradictions, guessed transfer syntax, library warnings); empty when none (decode.py).
    """
    source: str
    label: str | None = None
    probabilities: dict = field(default_factory=dict)
    error: str | None = None
    backend: str = ""
    precision: str = ""
    cam: np.ndarray | None = None
    cam_method: str | None = None
    original_size: tuple | None = None
    margin: float | None = None        # top-1 minus top-2 probability (0..1); None for an error result
    uncertain: bool | None = None      # margin below the running precision's near-tie threshold (nearties.py)
    warnings: list = field(default_factory=list)   # str each, naming the input: header contradictions, decoder warnings

    @property
    def ok(self) -> bool:
        """True when the input was classified (no error)."""
        return self.error is None

    @property
    def status(self) -> str:
        """"ok" or "error"."""
        return "ok" if self.error is None else "error"

    @property
    def probability(self) -> float | None:
        """The probability of the predicted label (None for an error result)."""
        return self.probabilities.get(self.label) if self.label else None


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) logits -> (N, K) float64 probabilities, numerically stable (max subtracted per row)."""
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)
