"""Class activation maps from any backend (postprocessing: feature map + head weights -> heatmap).

How a map is computed depends on the package's head (model.json `cam.head`) and the backend:

- GAP -> (Dropout) -> Linear ("linear"), any non-torch backend: the exact CAM of Zhou et al.
  The logit is z_c = sum_k W[c,k] * mean_ij F_k(i,j) + b_c, so CAM_c(i,j) = sum_k W[c,k] F_k(i,j)
  is the per-location contribution to it (the bias is spatially constant and dropped). W comes
  from the package's fp32 ONNX initializers (numpy + onnx only: no torch on the edge).
- torch backend, every architecture and head in the registry: Grad-CAM (Selvaraju et al.):
  channel weights alpha_c,k = spatial mean of d z_c / d F_k, map = ReLU(sum_k alpha_c,k F_k).
  For a GAP->linear head alpha = W[c] / (h*w): Grad-CAM and CAM coincide up to scale.
- MLP heads ("dense_relu", "mlp_mish"), and the Flatten heads ("flatten_dense", "flatten_linear",
  whose weights differ per location so no exact channel CAM exists) on a non-torch backend: the head's
  gradient w.r.t. the feature map, computed in numpy from the head weights at the image's actual
  features, spatially averaged into channel weights. Labelled "approximate": for a nonlinear head
  any channel-weighted map is a first-order (local) account of what the head does. The weights are
  the ones Grad-CAM uses (the gradient w.r.t. the feature map depends on the head alone), evaluated
  at the backend's own (possibly int8) features: on fp32 backends the map matches torch's autograd
  Grad-CAM to float precision (tests/test_explain.py measures it).

Every map is ReLU'd, upsampled (Pillow bilinear on a float image) to the image's original size
through the inverse of the preprocessing geometry, and normalised to 0..1.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .preprocess import resize_box
from .weights import ONNX_PREFIX, WeightsUnavailable, read_weights, weights_source

HEAD_ACTIVATION = {"linear": None, "dense_relu": "relu", "mlp_mish": "mish", "flatten_dense": "relu",
                   "flatten_linear": None}
FLATTEN_HEADS = ("flatten_dense", "flatten_linear")

METHOD_CAM = "CAM"
METHOD_GRAD_CAM = "Grad-CAM"
METHOD_APPROX = "approximate Grad-CAM"


class CamUnavailable(ValueError):
    """This package/backend combination cannot produce a class activation map."""


# -- head weights (numpy only) -------------------------------------------------------------------
@dataclass
class HeadWeights:
    """The head's dense layers as float32 numpy arrays: layers[i] = (W (out, in), b (out,))."""
    name: str                 # the head's registry name
    pooling: str              # "gap" (mean over the feature map) or "flatten"
    layers: list              # [(W (out, in) float32, b (out,) float32)], in order
    activation: str | None    # between the layers (None for a single linear layer)

    @property
    def exact(self) -> bool:
        """GAP -> linear: the CAM decomposition of the logit is exact."""
        return self.pooling == "gap" and len(self.layers) == 1


_HEAD_CACHE: dict = {}
_HEAD_LOCK = threading.Lock()


def read_head(package) -> HeadWeights:
    """The head's linear layers, read once per weights file (cached)."""
    head = (package.cam or {}).get("head") or package.architecture.get("head", "linear")
    if head not in HEAD_ACTIVATION:
        raise CamUnavailable(f"{package.root}: no CAM for head {head!r}")
    try:
        src, _ = weights_source(package)
    except WeightsUnavailable as e:
        raise CamUnavailable(str(e)) from None
    key = (str(src), src.stat().st_mtime_ns, src.stat().st_size)
    with _HEAD_LOCK:
        if key not in _HEAD_CACHE:
            try:
                tensors = {k: np.asarray(v, np.float32) for k, v in read_weights(package, "head.").items()}
            except ImportError:
                raise CamUnavailable("CAM on this backend reads the head weights from model.onnx and needs the "
                                     "'onnx' package (pip install onnx)") from None
            idx = sorted({int(m.group(1)) for k in tensors if (m := re.fullmatch(r"head\.(\d+)\.weight", k))
                          and tensors[k].ndim == 2})
            if not idx:
                raise CamUnavailable(f"{src}: no head weights ('{ONNX_PREFIX}head.N.weight') found")
            layers = [(tensors[f"head.{i}.weight"], tensors.get(f"head.{i}.bias",
                                                                np.zeros(len(tensors[f"head.{i}.weight"]), np.float32)))
                      for i in idx]
            _HEAD_CACHE[key] = HeadWeights(head, "flatten" if head in FLATTEN_HEADS else "gap", layers,
                                           HEAD_ACTIVATION[head] if len(layers) > 1 else None)
        return _HEAD_CACHE[key]


def _act(x, kind):
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "mish":
        return x * np.tanh(np.logaddexp(0.0, x))
    return x


def _act_grad(x, kind):
    if kind == "relu":
        return (x > 0).astype(x.dtype)
    if kind == "mish":
        sp = np.logaddexp(0.0, x)
        t = np.tanh(sp)
        return t + x * (1.0 - t * t) / (1.0 + np.exp(-x))
    return np.ones_like(x)


def _head_input(head: HeadWeights, features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    return f.mean(axis=(1, 2)) if head.pooling == "gap" else f.reshape(-1)


def head_logits(head: HeadWeights, features: np.ndarray) -> np.ndarray:
    """The head run in numpy on one (C, h, w) feature map: a check that the weights are the right ones."""
    x = _head_input(head, features)
    for i, (w, b) in enumerate(head.layers):
        x = w.astype(np.float64) @ x + b
        if i < len(head.layers) - 1:
            x = _act(x, head.activation)
    return x


def channel_weights(head: HeadWeights, features: np.ndarray, class_index: int) -> np.ndarray:
    """(C,) weights for one (C, h, w) feature map and one class.

    GAP -> linear head: W[c] (exact CAM). Otherwise the spatial mean of d logit_c / d F, the
    head's gradient taken in numpy at this image's features (what Grad-CAM computes with autograd)."""
    if head.exact:
        return head.layers[0][0][class_index].astype(np.float64)
    x = _head_input(head, features)
    pre = []
    for w, b in head.layers[:-1]:
        z = w.astype(np.float64) @ x + b
        pre.append(z)
        x = _act(z, head.activation)
    g = head.layers[-1][0][class_index].astype(np.float64)
    for (w, _), z in zip(reversed(head.layers[:-1]), reversed(pre)):
        g = (g * _act_grad(z, head.activation)) @ w.astype(np.float64)
    c, h, wd = features.shape
    if head.pooling == "gap":
        return g / (h * wd)                       # d logit / d F_k(i,j) is the same at every (i, j)
    return g.reshape(c, h, wd).mean(axis=(1, 2))


def weighted_map(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ReLU(sum_k weights_k * F_k): (h, w) float64."""
    cam = np.tensordot(np.asarray(weights, np.float64), np.asarray(features, np.float64), axes=(0, 0))
    return np.maximum(cam, 0.0)


# -- geometry: feature-map grid -> original image ---------------------------------------------------
def upsample(cam: np.ndarray, original_size: tuple, spec) -> np.ndarray:
    """(h, w) map over the model input -> (H, W) float32 in 0..1 over the original image.

    "stretch" maps the whole image onto the square input, so resizing the map to (W, H) is the
    exact inverse. "shorter_side_crop" saw only the centre crop: the map fills the crop box and
    the rest (never seen by the model) is 0."""
    width, height = int(original_size[0]), int(original_size[1])
    img = Image.fromarray(np.ascontiguousarray(cam, np.float32), mode="F")
    if spec.resize == "stretch":
        out = np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)
    else:
        _, (l, t, r, b) = resize_box(height, width, spec)
        x0, y0, x1, y1 = round(l), round(t), round(r), round(b)
        out = np.zeros((height, width), np.float32)
        out[y0:y1, x0:x1] = np.asarray(img.resize((x1 - x0, y1 - y0), Image.BILINEAR), dtype=np.float32)
    out = np.maximum(out, 0.0)
    top = float(out.max())
    return (out / top).astype(np.float32) if top > 0 else np.zeros_like(out)


def oriented_size(decoded) -> tuple:
    """The original (width, height), turned like the decoded pixels (EXIF rotation swaps them)."""
    w, h = decoded.original_size
    ph, pw = decoded.pixels.shape[:2]
    if (w > h and ph > pw) or (h > w and pw > ph):
        return h, w
    return w, h


# -- torch: Grad-CAM for any registry architecture ----------------------------------------------------
def torch_grad_cam(net, x):
    """Grad-CAM inputs for every class: (logits (N, K), features (N, C, h, w), weights (N, K, C)).

    weights[n, c] = spatial mean of d logits[n, c] / d features[n]: gradients of the class score
    w.r.t. the last feature map (the backbone's output). The backbone runs once without autograd;
    only the head is differentiated (the gradient w.r.t. the feature map needs nothing else)."""
    import torch
    with torch.inference_mode(False), torch.no_grad():
        f = net.backbone(x)
    f = f.detach().clone().requires_grad_(True)
    with torch.inference_mode(False), torch.enable_grad():
        logits = net.head(f)
        k = logits.shape[1]
        weights = []
        for c in range(k):
            (g,) = torch.autograd.grad(logits[:, c].sum(), f, retain_graph=c < k - 1)
            weights.append(g.mean(dim=(2, 3)))
    return logits.detach(), f.detach(), torch.stack(weights, 1)


def grad_cam(net, x, class_index=None):
    """(N, h, w) Grad-CAM maps (ReLU'd, not normalised) for `class_index` (int, or per-row
    sequence; None: the predicted class), plus the logits. Works for every CXRNet."""
    import torch
    logits, f, w = torch_grad_cam(net, x)
    if class_index is None:
        idx = logits.argmax(1)
    else:
        idx = torch.as_tensor(class_index, device=logits.device).expand(len(logits))
    alpha = w[torch.arange(len(logits), device=w.device), idx]           # (N, C)
    return torch.relu(torch.einsum("nc,nchw->nhw", alpha, f)), logits


# -- the engine the Classifier uses -----------------------------------------------------------------
class CamEngine:
    """Turns a backend's outputs into heatmaps. One per Classifier (created on first use)."""

    def __init__(self, package, backend):
        self.package = package
        self.backend = backend
        self.spec = package.preprocess
        self.is_torch = backend.name == "torch"
        if self.is_torch:
            if not hasattr(getattr(backend, "net", None), "backbone"):
                raise CamUnavailable("the torch backend has no network with a backbone/head split")
            self.head = None
            self.method = METHOD_GRAD_CAM
        else:
            out_name = (package.cam or {}).get("features_output")
            outputs = getattr(backend.artifact, "outputs", [])
            if not out_name or out_name not in outputs:
                raise CamUnavailable(f"{package.root}: {backend.artifact.file} has no feature-map output; "
                                     "re-export without --no-features, or use --backend torch (Grad-CAM)")
            self.head = read_head(package)
            self.method = METHOD_CAM if self.head.exact else METHOD_APPROX
        self.approximate = self.method == METHOD_APPROX

    def class_index(self, explain) -> int | None:
        """explain=True -> None (the predicted class); a class name -> its index."""
        if explain is True or explain is None:
            return None
        if isinstance(explain, str):
            if explain not in self.package.classes:
                raise ValueError(f"cannot explain class {explain!r}: not one of {self.package.classes}")
            return self.package.classes.index(explain)
        return int(explain)

    def torch_outputs(self, batch: np.ndarray) -> dict:
        """Run the torch reference with Grad-CAM on (N, C, H, W) float32: {'logits' (N, K),
        'features' (N, C', h, w), 'grad_weights' (N, K, C')} as numpy."""
        torch = self.backend.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).to(self.backend.device)
        logits, f, w = torch_grad_cam(self.backend.net, x)
        return {"logits": logits.float().cpu().numpy(), "features": f.float().cpu().numpy(),
                "grad_weights": w.double().cpu().numpy()}

    def lowres(self, out: dict, k: int, class_index: int) -> np.ndarray:
        """(h, w) ReLU'd map over the model input for row k of a batch's outputs."""
        if "features" not in out:
            raise CamUnavailable("the backend returned no feature map (was it asked with features=True?)")
        f = out["features"][k]
        if "grad_weights" in out:
            w = out["grad_weights"][k, class_index]
        else:
            w = channel_weights(self.head, f, class_index)
        return weighted_map(f, w)

    def heatmap(self, out: dict, k: int, class_index: int, original_size: tuple) -> np.ndarray:
        """(H, W) float32 in 0..1 at the original image size."""
        return upsample(self.lowres(out, k, class_index), original_size, self.spec)
