"""Architecture registry (timm-style): one place that knows every backbone and head.

Every model is a `CXRNet`: a convolutional `backbone` that returns the last feature map, and a
`head` (from the papers) that maps it to logits. Exporting the feature map as a second output is
what lets any backend compute a class activation map.

Registered: torchvision's densenet121/169, resnet18/50/101, vgg16/19, vgg19_bn, alexnet,
inception_v3 (all weights=None: nothing is ever downloaded), El Azhari's small separable-conv CNN
(`sepconv_cnn`), a logistic-regression baseline (`logreg`: the downsized image, flattened, into one
linear layer; Yang et al.), and, only when `timm` imports, Keras-family models the papers used that
torchvision lacks: `xception` (timm legacy_xception = Keras Xception), `nasnetalarge`,
`resnet50v2` / `resnet101v2` (timm resnetv2_50/101: pre-activation ResNets like Keras'
ResNet50V2/ResNet101V2), always with pretrained=False.

`resnet101` (torchvision, post-activation v1) is the stand-in for Keras' ResNet101V2 when timm is
not installed; the v2 (pre-activation) block order differs, the depth and widths are the same.

Input normalisation the ImageNet weights expect: torchvision models ImageNet mean/std, except
inception_v3, whose (TF-ported) weights expect x*2-1: torchvision hides that behind
`transform_input=True`, which this backbone does not apply, so inception experiments set
mean = std = 0.5 in their preprocess spec. timm's Xception/NASNet/ResNetV2 also want 0.5/0.5.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_BACKBONES: dict[str, Callable] = {}
HEADS = ("linear", "dense_relu", "mlp_mish", "flatten_dense", "flatten_linear")
TIMM_SOURCE: dict[str, str] = {}   # registry name -> timm model name (filled when timm imports)


def register(name: str):
    """Decorator: register a backbone builder under `name` (timm-style). The builder takes
    (torchvision/timm model or None, **options) and returns (backbone, feature channels, prefix)."""
    def deco(fn):
        _BACKBONES[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    """Every registered architecture name, sorted."""
    return sorted(_BACKBONES)


class CXRNet(nn.Module):
    """backbone (N, C_in, H, W) -> feature map (N, C, h, w); head -> logits (N, K) float32."""

    def __init__(self, backbone: nn.Module, head: nn.Module, features_channels: int, head_name: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.features_channels = features_channels
        self.head_name = head_name

    def forward(self, x):
        """(N, C_in, H, W) float32 -> (N, K) logits."""
        return self.head(self.backbone(x))

    def forward_with_features(self, x):
        """(N, C_in, H, W) -> ((N, K) logits, (N, C, h, w) last feature map, for CAM)."""
        f = self.backbone(x)
        return self.head(f), f


class WithFeatures(nn.Module):
    """Export wrapper: outputs (logits, features)."""
    def __init__(self, net: CXRNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        """(N, C_in, H, W) -> (logits, features), the two ONNX outputs."""
        return self.net.forward_with_features(x)


def make_head(name: str, channels: int, num_classes: int, dropout: float = 0.0, hidden: int | None = None,
              feature_hw: tuple | None = None) -> nn.Module:
    """A classification head from the papers (see HEADS), mapping (N, channels, h, w) to (N, num_classes).

    Raises:
        ValueError: unknown head, or a Flatten head without `feature_hw` (h, w).
    """
    gap = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    drop = [nn.Dropout(dropout)] if dropout else []
    if name == "linear":              # Yapicioglu: GAP -> (dropout) -> Dense(k)
        return nn.Sequential(*gap, *drop, nn.Linear(channels, num_classes))
    if name == "dense_relu":          # Bansal & Sridhar: AvgPool -> Dense(ReLU) -> Dense(k)
        h = hidden or 64
        return nn.Sequential(*gap, nn.Linear(channels, h), nn.ReLU(inplace=True), *drop, nn.Linear(h, num_classes))
    if name == "mlp_mish":            # Sun et al.: GAP -> Dense(64) -> Mish -> Dense(k)
        h = hidden or 64
        return nn.Sequential(*gap, nn.Linear(channels, h), nn.Mish(), *drop, nn.Linear(h, num_classes))
    if name == "flatten_dense":       # El Azhari: Flatten -> Dense(1000) -> Dense(k)
        if feature_hw is None:
            raise ValueError("flatten_dense head needs the feature map size (depends on the input size)")
        h = hidden or 1000
        return nn.Sequential(nn.Flatten(), nn.Linear(channels * feature_hw[0] * feature_hw[1], h),
                             nn.ReLU(inplace=True), *drop, nn.Linear(h, num_classes))
    if name == "flatten_linear":      # logistic regression: Flatten -> Dense(k) (softmax in the loss)
        if feature_hw is None:
            raise ValueError("flatten_linear head needs the feature map size (depends on the input size)")
        return nn.Sequential(nn.Flatten(), *drop, nn.Linear(channels * feature_hw[0] * feature_hw[1], num_classes))
    raise ValueError(f"unknown head {name!r}; expected one of {HEADS}")


def _tv(name):
    import torchvision.models as tvm
    if name == "inception_v3":
        return tvm.inception_v3(weights=None, aux_logits=False, init_weights=True)
    return getattr(tvm, name)(weights=None)


# registry name -> torchvision constructor whose ImageNet weights fit the backbone
TORCHVISION_SOURCE = {n: n for n in ("densenet121", "densenet169", "resnet18", "resnet50", "resnet101", "vgg16",
                                     "vgg19", "vgg19_bn", "alexnet", "inception_v3")}


class _Seq(nn.Module):
    """Backbone from a list of modules, ReLU'd where the torchvision model relies on forward()."""
    def __init__(self, body: nn.Module, final_relu: bool = False):
        super().__init__()
        self.body = body
        self.final_relu = final_relu

    def forward(self, x):
        x = self.body(x)
        return torch.relu(x) if self.final_relu else x


@register("densenet121")
def _densenet121(m=None, **_):
    m = m or _tv("densenet121")
    return _Seq(m.features, final_relu=True), 1024, "backbone.body."


@register("densenet169")
def _densenet169(m=None, **_):
    m = m or _tv("densenet169")
    return _Seq(m.features, final_relu=True), 1664, "backbone.body."


def _resnet(name, channels, m=None):
    m = m or _tv(name)
    body = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4)
    return _Seq(body), channels, "backbone.body."


@register("resnet18")
def _resnet18(m=None, **_):
    return _resnet("resnet18", 512, m)


@register("resnet50")
def _resnet50(m=None, **_):
    return _resnet("resnet50", 2048, m)


@register("resnet101")
def _resnet101(m=None, **_):
    return _resnet("resnet101", 2048, m)


@register("vgg16")
def _vgg16(m=None, **_):
    return _Seq((m or _tv("vgg16")).features), 512, "backbone.body."


@register("vgg19")
def _vgg19(m=None, **_):
    return _Seq((m or _tv("vgg19")).features), 512, "backbone.body."


@register("vgg19_bn")
def _vgg19_bn(m=None, **_):
    return _Seq((m or _tv("vgg19_bn")).features), 512, "backbone.body."


@register("alexnet")
def _alexnet(m=None, **_):
    return _Seq((m or _tv("alexnet")).features), 256, "backbone.body."


class _Inception(nn.Module):
    def __init__(self, m=None):
        super().__init__()
        m = m or _tv("inception_v3")
        self.body = nn.Sequential(*[getattr(m, n) for n in (
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
            "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
            "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")])

    def forward(self, x):
        """(N, 3, H, W) -> (N, widths[-1], H/16, W/16)."""
        return self.body(x)


@register("inception_v3")
def _inception_v3(m=None, **_):
    return _Inception(m), 2048, "backbone.body."


class SeparableCNN(nn.Module):
    """El Azhari's small from-scratch baseline: depthwise-separable conv blocks.

    norm="none" drops BatchNorm (used by the DDP equivalence test: on CPU there is no
    SyncBatchNorm, and per-process batch statistics would differ from one big batch's)."""
    def __init__(self, widths=(32, 64, 128, 256), norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"sepconv_cnn norm must be 'batch' or 'none', got {norm!r}")
        bn = (lambda c: [nn.BatchNorm2d(c)]) if norm == "batch" else (lambda c: [])
        layers, cin = [nn.Conv2d(3, widths[0], 3, stride=2, padding=1), *bn(widths[0]), nn.ReLU(inplace=True)], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.Conv2d(cin, w, 1), *bn(w),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        """(N, 3, H, W) -> (N, widths[-1], h, w)."""
        return self.body(x)


@register("sepconv_cnn")
def _sepconv(m=None, widths=(32, 64, 128, 256), norm="batch", **_):
    widths = tuple(int(w) for w in widths)
    return SeparableCNN(widths, norm), widths[-1], "backbone.body."


class ImageAsFeatures(nn.Module):
    """Logistic-regression 'backbone': the (optionally average-pooled) input image itself."""
    def __init__(self, pool: int | None = None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(pool) if pool else nn.Identity()

    def forward(self, x):
        """The input itself, average-pooled to pool x pool when `pool` is set."""
        return self.pool(x)


@register("logreg")
def _logreg(m=None, in_channels=3, pool=None, **_):
    """Yang et al.'s baseline: softmax regression on the downsized image's pixels (head
    "flatten_linear"); `pool` optionally averages the input down to pool x pool first."""
    return ImageAsFeatures(pool), int(in_channels), "backbone."


class _TimmBackbone(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


def _timm(name: str, in_chans: int = 3):
    import timm
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans)


def _register_timm():
    try:
        import timm  # noqa: F401  (optional extra)
    except ImportError:
        return
    for ours, theirs in (("xception", "legacy_xception"), ("nasnetalarge", "nasnetalarge"),
                         ("resnet50v2", "resnetv2_50"), ("resnet101v2", "resnetv2_101")):
        TIMM_SOURCE[ours] = theirs

        def fn(m=None, _n=theirs, in_channels=3, **_):
            m = m if m is not None else _timm(_n, int(in_channels))
            return _TimmBackbone(m), int(m.num_features), "backbone.model."
        register(ours)(fn)


_register_timm()


def _first_conv(module: nn.Module) -> tuple[nn.Module, str]:
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            return m, name
    raise ValueError("backbone has no Conv2d")


def _set_module(root: nn.Module, dotted: str, new: nn.Module):
    parent = root
    *path, last = dotted.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, last, new)


def build(arch: dict) -> CXRNet:
    """arch: {name, head, num_classes, in_channels, dropout, hidden, input_size, options}
    (model.json's 'architecture'; `options` go to the backbone builder, e.g. sepconv_cnn's norm)."""
    name = arch["name"]
    if name not in _BACKBONES:
        hint = " (xception, nasnetalarge, resnet50v2, resnet101v2 need the optional timm package)" \
            if name in ("xception", "nasnetalarge", "resnet50v2", "resnet101v2") else ""
        raise ValueError(f"unknown architecture {name!r}{hint}; known: {', '.join(list_models())}")
    in_ch = int(arch.get("in_channels", 3))
    backbone, channels, _ = _BACKBONES[name](None, in_channels=in_ch, **(arch.get("options") or {}))
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != in_ch:
        conv, cname = _first_conv(backbone)
        new = nn.Conv2d(in_ch, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None)
        _set_module(backbone, cname, new)
    feature_hw = None
    if arch.get("head") in ("flatten_dense", "flatten_linear"):
        with torch.no_grad():
            size = int(arch["input_size"])
            feature_hw = tuple(backbone.eval()(torch.zeros(1, in_ch, size, size)).shape[-2:])
    head = make_head(arch.get("head", "linear"), channels, int(arch["num_classes"]),
                     float(arch.get("dropout", 0.0)), arch.get("hidden"), feature_hw)
    return CXRNet(backbone, head, channels, arch.get("head", "linear"))


def cached_imagenet_weights(name: str):
    """The torchvision ImageNet weights file for `name` in the local torch hub cache
    ($TORCH_HOME/hub/checkpoints, where torchvision keeps what it downloaded), or None. Only looks."""
    from pathlib import Path
    if name not in TORCHVISION_SOURCE:
        return None
    try:
        import torchvision.models as tvm
        w = tvm.get_model_weights(TORCHVISION_SOURCE[name]).IMAGENET1K_V1
        f = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    except Exception:
        return None
    return f if f.is_file() else None


def _read_state(path) -> dict:
    from pathlib import Path
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("state_dict", "model"):  # common wrappers around a state dict
        if isinstance(state, dict) and k in state and isinstance(state[k], dict):
            state = state[k]
    return state


def _copy_into(net: CXRNet, src_backbone: nn.Module) -> None:
    own = net.backbone.state_dict()
    new = {}
    for k, v in src_backbone.state_dict().items():
        if k in own and own[k].shape != v.shape and v.ndim == 4 and own[k].shape[1] == 1 and v.shape[1] == 3:
            v = v.sum(1, keepdim=True)  # RGB filters -> one grayscale filter with the same response
        new[k] = v
    net.backbone.load_state_dict(new)


def load_torchvision_weights(net: CXRNet, name: str, path) -> None:
    """Initialise the backbone from a local ImageNet weights file (.pth state dict or .safetensors):
    torchvision's for the torchvision models, timm's for the timm ones. Never downloads. For a
    1-channel model the first conv's RGB filters are summed (same response to a gray image)."""
    state = _read_state(path)
    if name in TIMM_SOURCE:
        tm = _timm(TIMM_SOURCE[name])
        missing, unexpected = tm.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("fc.", "classifier.", "head.", "last_linear."))]
        if missing or unexpected:
            raise ValueError(f"{path}: not timm {TIMM_SOURCE[name]} weights (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        _copy_into(net, _BACKBONES[name](tm)[0])
        return
    if name not in TORCHVISION_SOURCE:
        raise ValueError(f"{name} has no ImageNet weights (torchvision: {', '.join(sorted(TORCHVISION_SOURCE))}"
                         + (f"; timm: {', '.join(sorted(TIMM_SOURCE))}" if TIMM_SOURCE else "") + ")")
    tv = _tv(TORCHVISION_SOURCE[name])
    if name.startswith("densenet"):  # old checkpoints name 'norm.1' where torchvision now has 'norm1'
        import re
        pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {(pat.sub(lambda m: m.group(1) + m.group(2), k)): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    missing, unexpected = tv.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "AuxLogits."))]
    if missing or unexpected:
        raise ValueError(f"{path}: not {name} ImageNet weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    _copy_into(net, _BACKBONES[name](tv)[0])
