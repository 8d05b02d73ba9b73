"""train/: dataset adapters, splits, registry, initialisation, strategies, losses, the loop
(resume, frozen layers, DDP), metrics, reports and every experiment file.

Real images from ../shared/data/cxr (skipped cleanly without it); the synthetic layouts are
small PNG/JPEG copies of those images written into tmp dirs. Nothing is mocked. The end-to-end
run of every experiment file is marked slow (`pytest -m slow`)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="train/ needs the workbench install (torch)")
pytest.importorskip("torchvision")

from conftest import CXR, need_shared_cxr, shared_images  # noqa: E402

from cxr_edge.train.metrics import classification_report  # noqa: E402
from cxr_edge.preprocess import PreprocessSpec  # noqa: E402
from cxr_edge import architectures as models  # noqa: E402
from cxr_edge.train.checkpoint import load_checkpoint, read_meta, save_checkpoint  # noqa: E402
from cxr_edge.train.data import (cap_per_class, cohen_label, load_dataset, map_labels,  # noqa: E402
                                 split_by_patient)
from cxr_edge.train.experiment import (apply_overrides, list_experiments, load_experiment,  # noqa: E402
                                       prepare_splits, run_experiment)
from cxr_edge.train.losses import FocalLoss, class_weights, make_loss  # noqa: E402
from cxr_edge.train.loop import (CachedImages, _should_stop, backbone_layers, init_weights,  # noqa: E402
                                 set_trainable, train, train_mode)
from cxr_edge.train.report import flat_metrics  # noqa: E402

HAS_TIMM = "xception" in models.list_models()


# -- helpers -----------------------------------------------------------------------------------------
def _small_copy(src: str, dst: Path, size: int = 48, mode: str = "L") -> Path:
    """A size x size copy of a real X-ray (never committed: tmp only)."""
    from PIL import Image
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert(mode).resize((size, size), Image.BILINEAR).save(dst)
    return dst


def _mask(dst: Path, size: int = 32) -> Path:
    """Two filled ellipses ("lungs"): a stand-in mask, 255 inside, 0 outside."""
    from PIL import Image, ImageDraw
    dst.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    d.ellipse((size * 0.08, size * 0.15, size * 0.40, size * 0.9), fill=255)
    d.ellipse((size * 0.60, size * 0.15, size * 0.92, size * 0.9), fill=255)
    im.save(dst)
    return dst


def _tiny_cfg(**kw) -> dict:
    cfg = {
        "name": "tiny", "seed": 0,
        "data": {"classes": ["covid", "normal", "pneumonia"], "normal_class": "normal"},
        "model": {"name": "sepconv_cnn", "head": "linear", "init": "random"},
        "preprocess": {"size": 32, "resize": "stretch", "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
        "loss": "ce", "optimizer": {"name": "adam", "lr": 0.003},
        "phases": [{"name": "train", "epochs": 1, "trainable": "all"}],
        "batch_size": 8, "channels_last": False,
    }
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _splits(n_train=16, n_val=8, seed=0):
    s = shared_images(n_train + n_val, seed=seed)
    return {"train": s[:n_train], "val": s[n_train:], "test": s[n_train:]}


def _state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _quiet(*a, **k):
    pass


# -- 1. dataset adapters -----------------------------------------------------------------------------
def test_manifest_adapter_reads_the_shared_set():
    root = need_shared_cxr()
    samples = load_dataset(root)
    assert len(samples) == 2950
    assert {s.label for s in samples} == {"covid", "normal", "pneumonia"}
    assert {s.sublabel for s in samples if s.label == "pneumonia"} >= {"bacterial", "viral", "unknown"}
    assert all(Path(s.path).is_file() for s in samples[:50])
    assert len({s.patient for s in samples}) == 1826


def test_class_folder_adapter_and_label_map(tmp_path):
    real = shared_images(6)
    root = tmp_path / "asraf"
    for i, s in enumerate(real):
        cls = {"covid": "COVID19", "normal": "NORMAL", "pneumonia": "PNEUMONIA"}[s.label]
        _small_copy(s.path, root / cls / f"img{i}.png")
    samples = load_dataset(root)  # auto -> class folders
    assert len(samples) == 6 and {s.label for s in samples} <= {"COVID19", "NORMAL", "PNEUMONIA"}
    truth = {f"img{i}": s.label for i, s in enumerate(real)}
    mapped = map_labels(samples, load_experiment("yapicioglu_densenet121_fe_ft")["data"]["label_map"])
    assert [s.label for s in mapped] == [truth[Path(s.path).stem] for s in samples]
    assert [s.path for s in map_labels(samples, {"NORMAL": None})] == [s.path for s in samples if s.label != "NORMAL"]


def test_kermany_adapter(tmp_path):
    real = shared_images(6, labels=("normal", "pneumonia"))
    base = tmp_path / "kermany" / "chest_xray"
    names = {("train", "PNEUMONIA"): ["person1_bacteria_1.jpeg", "person1_virus_7.jpeg"],
             ("val", "NORMAL"): ["NORMAL2-IM-0123-0001.jpeg"],
             ("test", "NORMAL"): ["IM-0115-0001.jpeg", "IM-0115-0002.jpeg"],
             ("test", "PNEUMONIA"): ["person22_virus_55.jpeg"]}
    i = 0
    for (part, cls), files in names.items():
        for f in files:
            _small_copy(real[i % len(real)].path, base / part / cls / f)
            i += 1
    samples = load_dataset(tmp_path / "kermany")
    by = {Path(s.path).name: s for s in samples}
    assert len(samples) == 6
    assert by["person1_bacteria_1.jpeg"].label == "pneumonia" and by["person1_bacteria_1.jpeg"].sublabel == "bacterial"
    assert by["person1_virus_7.jpeg"].sublabel == "viral"
    assert by["person1_bacteria_1.jpeg"].patient == by["person1_virus_7.jpeg"].patient == "kermany_person1"
    assert by["IM-0115-0001.jpeg"].patient == by["IM-0115-0002.jpeg"].patient == "kermany_IM-0115"
    assert by["NORMAL2-IM-0123-0001.jpeg"].label == "normal"
    # the Sun pneumonia experiments select this layout through their source filter
    cfg = apply_overrides(load_experiment("sun_pneumonia_scratch"))
    cfg["data"]["split"] = [0.5, 0.25, 0.25]
    parts = prepare_splits(cfg, tmp_path / "kermany")
    assert sum(len(v) for v in parts.values()) == 6


def test_radiography_adapter_applies_lung_masks(tmp_path):
    real = shared_images(8)
    root = tmp_path / "radiography" / "COVID-19_Radiography_Dataset"
    for i, s in enumerate(real):
        cls = {"covid": "COVID", "normal": "Normal", "pneumonia": "Viral Pneumonia"}[s.label]
        _small_copy(s.path, root / cls / "images" / f"{cls}-{i}.png", size=40)
        if i != 0:
            _mask(root / cls / "masks" / f"{cls}-{i}.png", size=32)  # masks are smaller, as in the database
    samples = load_dataset(tmp_path / "radiography")  # auto, one level above the class folders
    assert len(samples) == 8 and all(s.source == "radiography" for s in samples)
    assert sum(s.mask is not None for s in samples) == 7
    # applied when present: outside the lungs the image is black
    masked = [s for s in samples if s.mask][0]
    spec = PreprocessSpec(size=32, resize="stretch", channels=1, mean=(0.0,), std=(1.0,))
    ds = CachedImages([masked], [masked.label], spec)
    x = ds[0][0][0].numpy()
    assert x[:, 16].max() == 0.0 and x[0].max() == 0.0  # between the "lungs", above them
    assert x[12:20, 5:10].max() > 0.0  # inside one
    cfg = load_experiment("sun_densenet121_masked_3ch")
    with pytest.raises(ValueError, match="no mask"):
        prepare_splits(cfg, tmp_path / "radiography")  # one image lacks its mask
    cfg_raw = load_experiment("sun_densenet121_raw_3ch")
    cfg_raw["data"]["classes"] = sorted({s.label for s in samples})
    cfg_raw["data"]["split"] = [0.5, 0.25, 0.25]
    assert all(s.mask is None for v in prepare_splits(cfg_raw, tmp_path / "radiography").values() for s in v)


def test_cohen_adapter(tmp_path):
    real = shared_images(5)
    root = tmp_path / "cohen"
    rows = [("p1", "COVID-19", "X-ray", "a.png"), ("p1", "COVID-19, ARDS", "X-ray", "b.png"),
            ("p2", "Pneumonia/Bacterial/Streptococcus", "X-ray", "c.png"), ("p3", "No Finding", "X-ray", "d.png"),
            ("p4", "ARDS", "X-ray", "e.png"), ("p5", "COVID-19", "CT", "f.png"), ("p6", "SARS", "X-ray", "g.png")]
    root.mkdir()
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patientid", "finding", "modality", "view", "folder", "filename"])
        for i, (pid, finding, mod, fn) in enumerate(rows):
            w.writerow([pid, finding, mod, "PA", "images", fn])
            _small_copy(real[i % 5].path, root / "images" / fn)
    samples = load_dataset(root)
    assert [(s.label, s.sublabel) for s in samples] == [
        ("covid", "covid"), ("covid", "covid"), ("pneumonia", "bacterial"), ("normal", "normal"), ("ARDS", ""),
        ("pneumonia", "viral")]
    assert samples[0].patient == samples[1].patient == "cohen_p1"
    assert cohen_label("Pneumocystis")[0] == "pneumonia" and cohen_label("todo")[0] == "todo"


# -- splits and label maps ------------------------------------------------------------------------------
def test_split_is_patient_grouped_stratified_and_reproducible():
    samples = load_dataset(need_shared_cxr())
    a = split_by_patient(samples, (0.7, 0.15, 0.15), seed=3)
    b = split_by_patient(samples, (0.7, 0.15, 0.15), seed=3)
    c = split_by_patient(samples, (0.7, 0.15, 0.15), seed=4)
    assert a == b and a != c
    assert sum(len(v) for v in a.values()) == len(samples)
    pats = {k: {s.patient for s in v} for k, v in a.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    # stratified by (label, source): each stratum's patients are dealt out 70/15/15
    first = {}
    for s in samples:
        first.setdefault(s.patient, s)  # a patient is dealt with its first image's stratum
    strata = {}
    for pid, s in first.items():
        strata.setdefault((s.label, s.source), set()).add(pid)
    for key, pids in strata.items():
        n = len(pids)
        got = [len(pids & pats[k]) for k in ("train", "val", "test")]
        assert got == [round(0.7 * n), round(0.85 * n) - round(0.7 * n), n - round(0.85 * n)], (key, got)
    two = split_by_patient(samples, (0.8, 0.2), seed=0)
    assert set(two) == {"train", "test"}
    force = {samples[0].patient}
    assert all(s in split_by_patient(samples, (0.8, 0.1, 0.1), 0, force)["test"] for s in samples if s.patient in force)
    with pytest.raises(ValueError):
        split_by_patient(samples, (0.5, 0.2), seed=0)


def test_label_map_by_sublabel_and_cap():
    samples = load_dataset(need_shared_cxr())
    m = load_experiment("sun_densenet121_raw_3ch")["data"]["label_map"]
    mapped = map_labels(samples, m)
    count = {c: sum(s.label == c for s in mapped) for c in ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity")}
    assert count == {"COVID": 547, "Normal": 1212, "Viral Pneumonia": 310, "Lung_Opacity": 881}
    capped = cap_per_class([s for s in samples if s.label in ("covid", "normal")], {"covid": 70, "normal": 80}, seed=0)
    assert sum(s.label == "covid" for s in capped) <= 70 and sum(s.label == "covid" for s in capped) >= 60
    assert sum(s.label == "normal" for s in capped) <= 80 and sum(s.label == "normal" for s in capped) >= 70
    assert cap_per_class(samples, {"covid": 70}, 0) == cap_per_class(samples, {"covid": 70}, 0)


def test_limit_is_stratified_and_bansal_split_uses_test_as_val():
    cfg = apply_overrides(load_experiment("sun_densenet121_raw_3ch"), limit=20)
    parts = prepare_splits(cfg, need_shared_cxr())
    assert len(parts["train"]) == 20 and len(parts["val"]) == 8
    assert {s.label for s in parts["train"]} == set(cfg["data"]["classes"])  # even the rare class
    b = prepare_splits(load_experiment("bansal_vgg16"), need_shared_cxr())
    assert b["val"] is b["test"] and 130 <= len(b["train"]) + len(b["test"]) <= 150


# -- 2. registry, heads, initialisation ------------------------------------------------------------------
TORCHVISION_MODELS = ["densenet121", "resnet50", "resnet101", "vgg16", "vgg19", "vgg19_bn", "alexnet",
                      "inception_v3", "sepconv_cnn", "logreg"]


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_model_builds_and_runs(name):
    size = 80 if name == "inception_v3" else 64
    torch.manual_seed(0)
    for in_ch in ((1, 3) if name in ("densenet121", "sepconv_cnn", "logreg") else (3,)):
        head = "flatten_linear" if name == "logreg" else "linear"
        net = models.build({"name": name, "head": head, "num_classes": 3, "in_channels": in_ch, "input_size": size})
        with torch.no_grad():
            logits, feats = net.eval().forward_with_features(torch.zeros(2, in_ch, size, size))
        assert logits.shape == (2, 3) and feats.shape[1] == net.features_channels


def test_registry_covers_the_papers_models():
    assert set(TORCHVISION_MODELS) <= set(models.list_models())
    if HAS_TIMM:
        assert {"xception", "nasnetalarge", "resnet50v2", "resnet101v2"} <= set(models.list_models())
    else:
        with pytest.raises(ValueError, match="timm"):
            models.build({"name": "xception", "num_classes": 2})


@pytest.mark.parametrize("head", models.HEADS)
def test_heads(head):
    net = models.build({"name": "sepconv_cnn", "head": head, "num_classes": 4, "input_size": 64, "hidden": 16,
                        "dropout": 0.1})
    linears = [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[-1].out_features == 4
    if head == "flatten_dense":  # 64 px -> 4 x 4 map of 256 channels, flattened
        assert linears[0].in_features == 256 * 4 * 4 and linears[0].out_features == 16
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 4)


def test_imagenet_init_from_local_torchvision_file(tmp_path, monkeypatch):
    """A weights file made here (fixed seed) loads into our backbones: every tensor lands in the
    right place; for one channel the first conv is the sum of the RGB filters."""
    import torchvision.models as tvm
    from safetensors.torch import save_file
    torch.manual_seed(123)
    tv = tvm.resnet50(weights=None)
    sd = tv.state_dict()
    torch.save(sd, tmp_path / "resnet50.pth")
    net = models.build({"name": "resnet50", "head": "linear", "num_classes": 2, "input_size": 64})
    init_weights(net, {"name": "resnet50", "init": "imagenet", "init_path": str(tmp_path / "resnet50.pth")})
    own = net.backbone.state_dict()
    tv_names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    n = 0
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        top, rest = k.split(".", 1)
        assert torch.equal(own[f"body.{tv_names.index(top)}.{rest}"], v), k
        n += 1
    assert n == len(own)
    # densenet121, .safetensors, one channel (and Pillow-era 'norm.1' key names)
    torch.manual_seed(7)
    dn = tvm.densenet121(weights=None).state_dict()
    # the published file predates num_batches_tracked and names 'norm.1' / 'conv.1'
    old = {k.replace("norm1", "norm.1").replace("conv1", "conv.1") if "denselayer" in k else k: v.contiguous()
           for k, v in dn.items() if not k.endswith("num_batches_tracked")}
    save_file(old, str(tmp_path / "densenet121.safetensors"))
    net1 = models.build({"name": "densenet121", "head": "mlp_mish", "num_classes": 4, "in_channels": 1,
                         "input_size": 64})
    models.load_torchvision_weights(net1, "densenet121", tmp_path / "densenet121.safetensors")
    own = net1.backbone.state_dict()
    assert torch.equal(own["body.conv0.weight"], dn["features.conv0.weight"].sum(1, keepdim=True))
    assert own["body.conv0.weight"].shape[1] == 1
    for k, v in dn.items():
        if k.startswith("features.") and k != "features.conv0.weight" and not k.endswith("num_batches_tracked"):
            assert torch.equal(own["body." + k[len("features."):]], v), k
    # a gray image gives the same features through the summed 1-channel conv as through RGB
    net3 = models.build({"name": "densenet121", "head": "linear", "num_classes": 4, "input_size": 64})
    models.load_torchvision_weights(net3, "densenet121", tmp_path / "densenet121.safetensors")
    g = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net1.eval().backbone(g), net3.eval().backbone(g.expand(1, 3, 64, 64)), atol=1e-4)
    # the local torch hub cache is searched when no file is given; wrong files are refused
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(tvm.ResNet50_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    shutil.copy(tmp_path / "resnet50.pth", cached)
    assert models.cached_imagenet_weights("resnet50") == cached
    net2 = models.build({"name": "resnet50", "head": "linear", "num_classes": 2, "input_size": 64})
    init_weights(net2, {"name": "resnet50", "init": "imagenet"})
    assert torch.equal(net2.backbone.state_dict()["body.0.weight"], sd["conv1.weight"])
    with pytest.raises(ValueError, match="not densenet121"):
        models.load_torchvision_weights(net1, "densenet121", tmp_path / "resnet50.pth")


def test_missing_imagenet_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net = models.build({"name": "vgg16", "head": "linear", "num_classes": 2, "input_size": 32})
    with pytest.raises(FileNotFoundError, match="--init-path FILE.*--init random"):
        init_weights(net, {"name": "vgg16", "init": "imagenet"})


@pytest.mark.skipif(not HAS_TIMM, reason="timm not installed (pip install timm)")
def test_imagenet_init_from_local_timm_file(tmp_path):
    import timm
    torch.manual_seed(5)
    tm = timm.create_model("resnetv2_50", pretrained=False)  # with its classifier, as published files are
    torch.save(tm.state_dict(), tmp_path / "rv2.pth")
    net = models.build({"name": "resnet50v2", "head": "dense_relu", "num_classes": 2, "in_channels": 1,
                        "input_size": 64})
    models.load_torchvision_weights(net, "resnet50v2", tmp_path / "rv2.pth")
    own = net.backbone.state_dict()
    assert torch.equal(own["model.stem.conv.weight"], tm.state_dict()["stem.conv.weight"].sum(1, keepdim=True))
    assert torch.equal(own["model.stages.3.blocks.2.conv3.weight"], tm.state_dict()["stages.3.blocks.2.conv3.weight"])


def test_checkpoint_init_transfers_backbone_and_replaces_head(tmp_path):
    """COVID (4 classes) -> pneumonia (2 classes)."""
    torch.manual_seed(0)
    arch4 = {"name": "sepconv_cnn", "head": "mlp_mish", "num_classes": 4, "in_channels": 3, "input_size": 32}
    src = models.build(arch4)
    spec = PreprocessSpec(size=32, channels=3)
    save_checkpoint(tmp_path / "covid.safetensors", src, {"architecture": arch4, "classes": list("abcd"),
                                                          "preprocess": spec.to_dict()})
    torch.manual_seed(1)
    dst = models.build(dict(arch4, num_classes=2))
    before_head = {k: v.clone() for k, v in dst.head.state_dict().items()}
    init_weights(dst, {"name": "sepconv_cnn", "init": "checkpoint", "init_path": str(tmp_path / "covid.safetensors")})
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v)
    assert torch.equal(dst.head.state_dict()["2.weight"], src.head.state_dict()["2.weight"])  # Dense(64) transfers
    assert torch.equal(dst.head.state_dict()["4.weight"], before_head["4.weight"])  # new 2-class layer
    other = models.build({"name": "resnet50", "head": "linear", "num_classes": 2, "input_size": 32})
    with pytest.raises(ValueError, match="does not fit"):
        init_weights(other, {"name": "resnet50", "init": "checkpoint", "init_path": str(tmp_path / "covid.safetensors")})


# -- 3. strategies, losses, early stopping ----------------------------------------------------------------
def test_trainable_rules():
    net = models.build({"name": "densenet121", "head": "linear", "num_classes": 3, "input_size": 64})
    layers = backbone_layers(net)
    total_head = sum(p.numel() for p in net.head.parameters())
    assert set_trainable(net, "head") == total_head
    assert all(not p.requires_grad for p in net.backbone.parameters())
    n_mod = set_trainable(net, {"from_module": "body.denseblock2.denselayer7.conv2"})
    start = [n for n, _ in layers].index("body.denseblock2.denselayer7.conv2")
    assert n_mod == set_trainable(net, {"from_layer": start})
    assert start == 55  # Keras DenseNet121 layer 100 (conv3_block7_2_conv)
    assert [n for n, m in layers if any(p.requires_grad for p in m.parameters())][0] == "body.denseblock2.denselayer7.conv2"
    set_trainable(net, {"last_fraction": 0.25})
    trainable = [any(p.requires_grad for p in m.parameters()) for _, m in layers]
    assert sum(trainable) == len(layers) - round(len(layers) * 0.75) and trainable[-1] and not trainable[0]
    assert set_trainable(net, "all") == sum(p.numel() for p in net.parameters())
    with pytest.raises(ValueError):
        set_trainable(net, {"from_module": "body.nope"})


def test_class_weights_match_the_formulas():
    counts = [547, 881, 1212, 310]
    n, k = sum(counts), len(counts)
    assert np.allclose(class_weights(counts, "one_minus_cf"), [1 - c / n for c in counts])
    assert np.allclose(class_weights(counts, "inverse_cf"), [n / (k * c) for c in counts])
    assert np.allclose(class_weights([5, 5], "inverse_cf"), [1, 1])
    with pytest.raises(ValueError):
        class_weights([3, 0], "inverse_cf")
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-2.0, 1.0, 0.0, 3.0]])
    y = torch.tensor([0, 2, 3])
    logp = torch.log_softmax(logits, 1)[torch.arange(3), y]
    for name, scheme in (("wce_one_minus_cf", "one_minus_cf"), ("wce_inverse_cf", "inverse_cf")):
        w = torch.tensor(class_weights(counts, scheme), dtype=torch.float32)[y]
        assert torch.allclose(make_loss(name, counts)(logits, y), -(w * logp).sum() / w.sum())
    assert torch.allclose(make_loss("ce", counts)(logits, y), -logp.mean())
    p = logp.exp()
    assert torch.allclose(make_loss("focal", counts)(logits, y), (-(1 - p) ** 2 * logp).mean())
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), -logp.mean())


def test_metrics_match_a_hand_computed_confusion_matrix():
    classes = ["covid", "normal", "pneumonia"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 2, 1, 1, 0, 2, 2, 1, 2, 2])
    probs = np.eye(3)[pred] * 0.8 + 0.1
    r = classification_report(y, probs, classes, "normal")
    cm = [[2, 1, 1], [1, 2, 0], [0, 1, 4]]
    assert r["confusion_matrix"] == cm
    assert r["accuracy"] == pytest.approx(8 / 12)
    prec = [2 / 3, 2 / 4, 4 / 5]
    rec = [2 / 4, 2 / 3, 4 / 5]
    f1 = [2 * p * q / (p + q) for p, q in zip(prec, rec)]
    for i, c in enumerate(classes):
        assert r["per_class"][c]["precision"] == pytest.approx(prec[i])
        assert r["per_class"][c]["recall"] == pytest.approx(rec[i])
        assert r["per_class"][c]["f1"] == pytest.approx(f1[i])
    # specificity of covid: TN / (TN + FP) = (2+0+1+4) / (7 + 1)
    assert r["per_class"]["covid"]["specificity"] == pytest.approx(7 / 8)
    assert r["macro"]["f1"] == pytest.approx(np.mean(f1))
    assert r["weighted"]["f1"] == pytest.approx(np.dot(f1, [4, 3, 5]) / 12)
    assert r["micro"]["f1"] == pytest.approx(8 / 12)
    assert r["disease_called_normal"] == {"covid": 1, "pneumonia": 1}
    # binary: sensitivity / specificity of the disease class
    yb = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pb = np.array([0, 0, 1, 1, 1, 1, 1, 0])
    rb = classification_report(yb, np.eye(2)[pb], ["covid", "non_covid"], "non_covid")
    assert rb["sensitivity"] == pytest.approx(2 / 3) and rb["specificity"] == pytest.approx(4 / 5)
    flat = flat_metrics({"test": r, "history": [{}, {}], "best_epoch": 2})
    assert flat["accuracy"] == pytest.approx(100 * 8 / 12) and flat["epochs"] == 2
    assert flat["disease_called_normal_covid"] == 1 and flat["covid_recall"] == pytest.approx(50.0)


def test_early_stopping_rules():
    rule = {"target_val_acc": 0.89, "max_val_loss": 0.3}
    st = {"bad_epochs": 0}
    assert _should_stop(rule, st, {"val_acc": 0.90, "val_loss": 0.25})
    assert not _should_stop(rule, st, {"val_acc": 0.90, "val_loss": 0.35})
    assert not _should_stop(rule, st, {"val_acc": 0.88, "val_loss": 0.1})
    assert _should_stop({"patience": 2}, {"bad_epochs": 2}, {"val_acc": 0, "val_loss": 9})
    assert not _should_stop({"patience": 2}, {"bad_epochs": 1}, {"val_acc": 0, "val_loss": 9})
    assert not _should_stop({}, {"bad_epochs": 99}, {"val_acc": 1, "val_loss": 0})


# -- 6. the loop on real images ---------------------------------------------------------------------------
def test_loss_goes_down_on_real_images():
    torch.manual_seed(0)
    samples = shared_images(16, seed=1)
    classes = ["covid", "normal", "pneumonia"]
    spec = PreprocessSpec(size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    ds = CachedImages(samples, classes, spec)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.labels)
    net = models.build({"name": "sepconv_cnn", "head": "linear", "num_classes": 3, "input_size": 32})
    crit = make_loss("wce_inverse_cf", np.bincount(ds.labels, minlength=3) + 1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    losses = []
    for _ in range(12):
        loss = crit(net.train()(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    arch = {"name": "densenet121", "head": "mlp_mish", "num_classes": 4, "in_channels": 1, "input_size": 48,
            "hidden": 64}
    net = models.build(arch).eval()
    spec = PreprocessSpec(size=48, channels=1, mean=(0.449,), std=(0.226,))
    meta = {"architecture": arch, "classes": ["a", "b", "c", "d"], "normal_class": "c", "preprocess": spec.to_dict()}
    save_checkpoint(tmp_path / "m.safetensors", net, meta)
    back, meta2 = load_checkpoint(tmp_path / "m.safetensors")
    ds = CachedImages(shared_images(4), ["covid", "normal", "pneumonia"], spec)
    x = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        assert torch.equal(net(x), back(x))
    assert meta2 == meta and read_meta(tmp_path / "m.safetensors")["classes"] == ["a", "b", "c", "d"]


def test_frozen_base_stays_frozen(tmp_path):
    """Feature extraction on a BatchNorm model: backbone weights and BN running stats bitwise
    unchanged, head changed; then fine-tuning from a module: the layers before it unchanged."""
    cfg = _tiny_cfg(model={"name": "resnet18", "head": "dense_relu", "hidden": 8, "init": "random"},
                    phases=[{"name": "fe", "epochs": 1, "trainable": "head"}], batch_size=4)
    splits = _splits(8, 4)
    torch.manual_seed(0)
    ref = models.build({"name": "resnet18", "head": "dense_relu", "hidden": 8, "num_classes": 3, "input_size": 32})
    train(cfg, splits, tmp_path / "fe", device="cpu", resume=False, log=_quiet)
    after = _state(tmp_path / "fe" / "last.pt")
    for k, v in ref.backbone.state_dict().items():
        assert torch.equal(after["backbone." + k], v), k  # incl. running_mean/var, num_batches_tracked
    assert not torch.equal(after["head.2.weight"], ref.head.state_dict()["2.weight"])

    cfg2 = _tiny_cfg(model={"name": "resnet18", "head": "dense_relu", "hidden": 8, "init": "random"},
                     phases=[{"name": "ft", "epochs": 1, "trainable": {"from_module": "body.7"}}], batch_size=4)
    train(cfg2, splits, tmp_path / "ft", device="cpu", resume=False, log=_quiet)
    after = _state(tmp_path / "ft" / "last.pt")
    changed = {k.split(".")[1] for k, v in ref.backbone.state_dict().items()
               if not torch.equal(after["backbone." + k], v)}
    assert changed == {"7"}  # only layer4 (body.7) trained, and its BN statistics moved


def test_train_mode_keeps_frozen_bn_in_eval():
    net = models.build({"name": "resnet18", "head": "linear", "num_classes": 2, "input_size": 32})
    set_trainable(net, {"from_module": "body.6"})
    train_mode(net)
    bns = [(n, m) for n, m in net.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not m.training for n, m in bns if not n.startswith(("body.6", "body.7")))
    assert all(m.training for n, m in bns if n.startswith(("body.6", "body.7")))


def test_resume_continues_where_it_stopped(tmp_path):
    """2 epochs in one go == 1 epoch, stop, resume for the 2nd (with augmentation and dropout:
    the data order, augmentation and dropout streams continue)."""
    cfg2 = _tiny_cfg(model={"name": "sepconv_cnn", "head": "linear", "dropout": 0.3, "init": "random"},
                     augment={"rotation": 10, "hflip": True, "zoom": 0.1},
                     phases=[{"name": "a", "epochs": 1, "trainable": "head"}, {"name": "b", "epochs": 2, "trainable": "all"}],
                     schedule={"name": "multistep", "milestones": [1]})
    splits = _splits(16, 8)
    straight = train(cfg2, splits, tmp_path / "straight", device="cpu", resume=False, log=_quiet)
    cfg1 = json.loads(json.dumps(cfg2))
    cfg1["phases"][1]["epochs"] = 1  # "interrupted" after the 2nd epoch overall
    train(cfg1, splits, tmp_path / "resumed", device="cpu", resume=False, log=_quiet)
    first = _state(tmp_path / "resumed" / "last.pt")
    logs = []
    resumed = train(cfg2, splits, tmp_path / "resumed", device="cpu", resume=True, log=logs.append)
    assert any("resumed from" in m for m in logs)
    assert len(resumed.history) == len(straight.history) == 3
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6) and a["val_acc"] == b["val_acc"]
    s1, s2 = _state(tmp_path / "straight" / "last.pt"), _state(tmp_path / "resumed" / "last.pt")
    assert any(not torch.equal(first[k], s2[k]) for k in s2)  # it really trained after resuming
    for k in s1:
        assert torch.allclose(s1[k].float(), s2[k].float(), atol=1e-6), k
    # phase-end checkpoints of a two-phase run
    assert (tmp_path / "straight" / "phase0.safetensors").is_file()
    assert (tmp_path / "straight" / "phase1.safetensors").is_file()


def test_dataset_normalisation_and_one_channel(tmp_path):
    cfg = _tiny_cfg(preprocess={"size": 32, "resize": "stretch", "channels": 1, "mean": "dataset", "std": "dataset"})
    splits = _splits(8, 4)
    res = train(cfg, splits, tmp_path, device="cpu", resume=False, log=_quiet)
    meta = read_meta(res.best_checkpoint)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    ds = CachedImages(splits["train"], ["covid", "normal", "pneumonia"], PreprocessSpec(size=32, channels=1, mean=(0,), std=(1,)))
    pix = np.concatenate([c.astype(np.float64).ravel() for c in ds.cache])
    assert spec.channels == 1 and spec.mean[0] == pytest.approx(pix.mean(), abs=1e-5)
    assert spec.std[0] == pytest.approx(pix.std(), abs=1e-5)
    net, _ = load_checkpoint(res.best_checkpoint)
    assert net.backbone.body[0].in_channels == 1


def _torchrun_env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo) vs 1 process, same config: the same global batches
    (ShardedBatchSampler), gradients averaged over equal halves of each batch == the one-process
    mean-loss gradient. No augmentation (per-process augmentation streams differ), plain CE
    (a weighted mean over halves is not the weighted mean over the batch), and a model without
    BatchNorm in train mode (no SyncBatchNorm on CPU: per-process batch statistics would differ).
    Two phases: DDP is rebuilt when the trainable set changes."""
    need_shared_cxr()
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    cfg = _tiny_cfg(model={"name": "sepconv_cnn", "head": "dense_relu", "hidden": 16, "init": "random",
                           "options": {"norm": "none", "widths": [8, 16, 32]}},
                    data={"layout": "manifest", "classes": ["covid", "normal", "pneumonia"], "normal_class": "normal",
                          "exclude_views": ["L"], "split": [0.8, 0.1, 0.1], "limit": 16},
                    phases=[{"name": "fe", "epochs": 1, "trainable": "head"},
                            {"name": "ft", "epochs": 1, "trainable": "all"}],
                    batch_size=8, optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9})
    exp = tmp_path / "ddp_tiny.json"
    exp.write_text(json.dumps(cfg))
    cli = [shutil.which("cxr-edge") or "cxr-edge", "train", str(exp), "--data", str(CXR), "--device", "cpu"]
    one = subprocess.run(cli + ["--out", str(tmp_path / "one")], env=_torchrun_env(), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "--no-python"] + cli
                         + ["--out", str(tmp_path / "two")], env=_torchrun_env(), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, (two.stdout[-2000:], two.stderr[-3000:])
    a, b = _state(tmp_path / "one" / "last.pt"), _state(tmp_path / "two" / "last.pt")
    init = models.build({"name": "sepconv_cnn", "head": "dense_relu", "hidden": 16, "num_classes": 3,
                         "input_size": 32, "options": {"norm": "none", "widths": [8, 16, 32]}})
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), (k, (a[k] - b[k]).abs().max())
    assert not torch.equal(a["backbone.body.0.weight"], init.backbone.body[0].weight.detach())  # both trained
    la = list(csv.DictReader(open(tmp_path / "one" / "log.csv")))
    lb = list(csv.DictReader(open(tmp_path / "two" / "log.csv")))
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):
        assert float(ra["val_loss"]) == pytest.approx(float(rb["val_loss"]), rel=1e-4)
        # train_loss: one process logs the mean over all batches; rank 0 logs its own halves
    assert json.loads((tmp_path / "two" / "report.json").read_text())["test"]["n"] > 0


# -- 4. experiment files --------------------------------------------------------------------------------
EXPERIMENTS = list_experiments()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_file_loads_and_builds(name):
    cfg = load_experiment(name)
    for key in ("paper", "data", "model", "preprocess", "loss", "optimizer", "batch_size"):
        assert key in cfg, key
    assert cfg.get("phases") or cfg.get("epochs")
    if "timm" in cfg.get("requires", []) and not HAS_TIMM:
        pytest.skip("needs timm")
    # built at a reduced input size (the flatten heads scale with it; full size is the GPU's job)
    pp = dict(apply_overrides(cfg, image_size=80 if cfg["model"]["name"] == "inception_v3" else 64)["preprocess"])
    ch = pp.get("channels", 3)
    if pp.get("mean") == "dataset":
        pp["mean"], pp["std"] = [0.5] * ch, [0.25] * ch
    spec = PreprocessSpec.from_dict(pp)
    arch = dict(cfg["model"], num_classes=len(cfg["data"]["classes"]), in_channels=spec.channels, input_size=spec.size)
    net = models.build(arch)
    for ph in cfg.get("phases", []):
        set_trainable(net, ph.get("trainable", "all"))
    make_loss(cfg["loss"], [3] * len(cfg["data"]["classes"]))
    # every reported number has a reproduced counterpart under the same key
    classes = cfg["data"]["classes"]
    fake = classification_report(np.arange(len(classes)), np.eye(len(classes)), classes, cfg["data"].get("normal_class"))
    known = flat_metrics({"test": fake, "history": [], "best_epoch": 1,
                          "test_by_phase": {ph["name"]: fake for ph in cfg.get("phases", []) if len(cfg["phases"]) > 1}})
    for k, v in (cfg.get("reported") or {}).items():
        if k != "note":
            assert k in known, f"{name}: reported key {k!r} has no reproduced metric"
            assert isinstance(v, (int, float))
    if name != "default_densenet121":
        assert cfg.get("reported"), "paper experiments carry the paper's numbers (or a note why none)"


def test_cli_end_to_end_writes_checkpoint_report_and_plots(tmp_path, monkeypatch):
    from cxr_edge.cli import main
    need_shared_cxr()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_torch_cache"))
    out = tmp_path / "run"
    rc = main(["train", "elazhari_sepconv", "--data", str(CXR), "--out", str(out), "--epochs", "1",
               "--image-size", "48", "--limit", "24", "--device", "cpu"])
    assert rc == 0
    for f in ("best.safetensors", "last.pt", "log.csv", "report.md", "report.json", "split.json",
              "curves.png", "confusion_matrix.png", "roc.png"):
        assert (out / f).is_file(), f
    net, meta = load_checkpoint(out / "best.safetensors")
    assert meta["classes"] == ["covid", "non_covid"] and meta["preprocess"]["size"] == 48
    rep = json.loads((out / "report.json").read_text())
    assert rep["reproduced"]["epochs"] == 1 and "| metric | reproduced | reported |" in (out / "report.md").read_text()
    # an experiment that needs ImageNet weights says so, and how to go on without them
    rc = main(["train", "elazhari_densenet121", "--data", str(CXR), "--out", str(tmp_path / "x"), "--epochs", "1",
               "--image-size", "32", "--limit", "8"])
    assert rc == 2


# -- 7. every experiment file end to end at reduced size ---------------------------------------------------
@pytest.fixture(scope="session")
def radiography_like(tmp_path_factory):
    """A small Radiography-layout copy of real images, with stand-in (two-ellipse) lung masks."""
    root = tmp_path_factory.mktemp("radiography")
    m = {"covid": "COVID", "normal": "Normal"}
    for i, s in enumerate(shared_images(80, seed=2)):
        cls = m.get(s.label) or ("Viral Pneumonia" if s.sublabel == "viral" else "Lung_Opacity")
        _small_copy(s.path, root / cls / "images" / f"{cls}-{i}.png", size=72)
        _mask(root / cls / "masks" / f"{cls}-{i}.png", size=64)
    return root


@pytest.fixture(scope="session")
def covid_checkpoint(tmp_path_factory):
    """A 4-class DenseNet121 (Sun head) checkpoint for the COVID -> pneumonia transfer runs."""
    torch.manual_seed(0)
    arch = {"name": "densenet121", "head": "mlp_mish", "hidden": 64, "num_classes": 4, "in_channels": 3,
            "input_size": 64}
    path = tmp_path_factory.mktemp("covid") / "best.safetensors"
    save_checkpoint(path, models.build(arch), {"architecture": arch, "classes": ["COVID", "Lung_Opacity", "Normal",
                                                                                 "Viral Pneumonia"],
                                               "preprocess": PreprocessSpec(size=64).to_dict()})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != "default_densenet121"])
def test_experiment_runs_end_to_end_at_reduced_size(name, tmp_path, radiography_like, covid_checkpoint):
    cfg = load_experiment(name)
    if "timm" in cfg.get("requires", []) and not HAS_TIMM:
        pytest.skip("needs timm")
    data = radiography_like if cfg["data"].get("masks") is True else need_shared_cxr()
    size = 80 if cfg["model"]["name"] == "inception_v3" else 64
    init = cfg["model"].get("init", "random")
    cfg = apply_overrides(cfg, epochs=1, image_size=size, limit=24,
                          init="random" if init == "imagenet" else None,
                          init_path=covid_checkpoint if init == "checkpoint" else None)
    rep = run_experiment(cfg, data, tmp_path, device="cpu", resume=False, log=_quiet)
    assert rep["test"]["n"] > 0 and rep["reproduced"]["epochs"] >= 1
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "report.md").is_file()
    net, meta = load_checkpoint(tmp_path / "best.safetensors")
    assert meta["classes"] == cfg["data"]["classes"]
