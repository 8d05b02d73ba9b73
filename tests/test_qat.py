"""QAT by distillation (export/qat.py): weight folding keeps the graph's values, the fine-tuned
network keeps its head and stem in float, and its Q/DQ export runs on ONNX Runtime as it trained."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")
from cxr_edge.export.qat import compact_weights


def _run(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _qdq_conv(path):
    """input -> Q/DQ (uint8) -> Conv whose float weight goes through Q/DQ (int8, per channel)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w[0, 0, 0, 0] = 5.0                      # saturates: the fold must clip like QuantizeLinear
    wscale = (np.abs(w).reshape(8, -1).max(1) / 100).astype(np.float32)
    wscale[0] = 0.01
    nodes = [
        helper.make_node("Constant", [], ["ws"], value=numpy_helper.from_array(wscale)),
        helper.make_node("Constant", [], ["wz"], value=numpy_helper.from_array(np.zeros(8, np.int8))),
        helper.make_node("Constant", [], ["as"], value=numpy_helper.from_array(np.float32(0.01))),
        helper.make_node("Constant", [], ["az"], value=numpy_helper.from_array(np.uint8(3))),
        helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("QuantizeLinear", ["input", "as", "az"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"]),
        helper.make_node("Conv", ["xd", "wd"], ["logits"], pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, 6, 6])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_compact_weights_keeps_every_value_and_stores_integers(tmp_path):
    p = tmp_path / "m.onnx"
    _qdq_conv(p)
    x = np.random.default_rng(1).uniform(0, 2, (1, 4, 6, 6)).astype(np.float32)
    before, size = _run(p, x), p.stat().st_size
    compact_weights(p)
    m = onnx.load(str(p))
    assert np.array_equal(_run(p, x), before)
    assert [t.data_type for t in m.graph.initializer] == [TensorProto.INT8]
    assert sum(n.op_type == "QuantizeLinear" for n in m.graph.node) == 1      # the activation's stays
    assert p.stat().st_size < size
    compact_weights(p)                                                        # idempotent
    assert np.array_equal(_run(p, x), before)


@pytest.mark.slow   # the first NNCF-for-torch use on a machine compiles its C++ extension (minutes)
def test_qat_fine_tunes_and_exports_what_it_trained(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("nncf")
    from cxr_edge.export import qat

    from cxr_edge.architectures import WithFeatures, build
    torch.manual_seed(0)
    net = build({"name": "sepconv_cnn", "head": "linear", "num_classes": 3, "in_channels": 3}).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (24, 3, 32, 32)).astype(np.float32)
    head_before = {k: v.clone() for k, v in net.head.state_dict().items()}
    t_logits, t_feats = qat.teacher_outputs(net, x)
    stem, *heads = qat.float_nodes(WithFeatures(net).eval(), torch.from_numpy(x[:1]))
    assert "conv" in stem and heads and all("linear" in h for h in heads)
    qnet = qat.quantize_for_training(net, x[:8])
    hist = qat.fine_tune(qnet, x, t_logits, t_feats, epochs=2, lr=1e-4, batch=8, log=lambda *_: None)
    assert len(hist) == 2 and all(np.isfinite(h["kl"]) and h["kl"] >= 0 for h in hist)
    path = qat.compact_weights(qat.export_qdq(qnet, (3, 32, 32), tmp_path / "q.onnx"))
    m = onnx.load(str(path))
    assert [o.name for o in m.graph.output] == ["logits", "features"]
    # the head is frozen and in float: its initializers are the fp32 weights, bit for bit
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for k, v in head_before.items():
        match = [a for n, a in inits.items() if n.endswith(f"head.{k}") and a.dtype == np.float32]
        assert match and np.array_equal(match[0], v.numpy()), k
    dq_out = {o for n in m.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert not any(i in dq_out for i in convs[0].input)           # stem in float
    assert any(i in dq_out for n in convs[1:] for i in n.input)     # the rest quantized
    with torch.no_grad():
        want = qnet(torch.from_numpy(x[:4]))[0].numpy()
    got = _run(path, x[:4])
    # ONNX Runtime's Q/DQ and NNCF's fake quantization agree up to rounding at bin edges
    assert np.abs(got - want).max() < 0.05 * (np.abs(want).max() + 1)


def _package_copy(src, dst):
    import shutil
    shutil.copytree(src, dst)        # real copies: nothing written below reaches the session fixture
    return dst


def _split(tmp_path, images):
    import json
    # The int8 gate decides on a 95 % lower bound of agreement, which needs ~75 agreeing images to
    # pass: the 16 samples are repeated 6 times (this test is about install's mechanics).
    rows = [{"path": str(p), "label": "normal", "source": "samples", "patient": p.stem} for p in images] * 6
    p = tmp_path / "split.json"
    p.write_text(json.dumps({"train": [], "val": rows[:48], "test": rows[48:]}))
    return str(p)


def test_install_gates_a_candidate_and_leaves_the_package_unchanged_on_failure(tmp_path, tiny_package):
    from conftest import sample_images
    from cxr_edge.export import qat
    from cxr_edge.package import ModelPackage
    pkg_dir = _package_copy(tiny_package, tmp_path / "p.cxrpkg")
    split = _split(tmp_path, sample_images())
    before = {f.name: f.read_bytes() for f in pkg_dir.iterdir()}
    # a candidate that cannot agree with the reference: the classifier's sign flipped
    m = onnx.load(str(pkg_dir / ModelPackage.read(pkg_dir).artifact("int8").file))
    for t in m.graph.initializer:
        if "head." in t.name and t.name.endswith(".weight") and t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(RuntimeError, match="unchanged"):
        qat.install(pkg_dir, bad, split, {"method": "test"}, log=lambda *_: None)
    assert {f.name: f.read_bytes() for f in pkg_dir.iterdir()} == before
    # a candidate that agrees (the fp32 graph itself) is gated, moved in place and checksummed
    rows = qat.install(pkg_dir, pkg_dir / "model.onnx", split, {"method": "test"}, log=lambda *_: None)
    assert rows and any(g.passed for _, _, g in rows)
    pkg = ModelPackage.read(pkg_dir)        # verifies every listed file's sha256 and size
    art = pkg.artifact("int8")
    assert art.extra == {"method": "test"} and not any(f.name.startswith("candidate.") for f in pkg_dir.iterdir())
    assert (pkg_dir / art.file).read_bytes() == (pkg_dir / "model.onnx").read_bytes()
